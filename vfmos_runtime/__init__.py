"""The shared runtime every VFMOS part may import: errors, paths, protocol, servers, config, storage."""
