"""VFMOS kernel (vfmd): process table, scheduler, quotas, identity and service registry."""
