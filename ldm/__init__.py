"""ldm: train, fine-tune and evaluate latent diffusion models."""

__version__ = "0.1.0"
