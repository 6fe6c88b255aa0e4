"""Fast attention kernels; each must match the jnp path (``jaxlongvid.attention.reference``) in tests."""
