"""Generated gRPC code for VFMOS syscalls (from the .proto files beside it)."""
