"""Neural-network modules: attention, the Wan 2.2 DiT, the Wan 2.2 VAE, the text encoder."""
