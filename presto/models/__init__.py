"""Networks (the DiT, the VAE, discriminators), their attention kernels and their weights on disk.

Nothing is re-exported here, so importing one model module never pulls in the others.
"""
