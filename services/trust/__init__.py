"""vfm-trustd: graduated verification (system 1 fast checks, system 2 deliberate ones) of
what goes into and comes out of a model, tenant trust policies."""
