"""distvae: convolutional VAEs on CelebA and any folder of images, from one CPU to many GPU nodes."""

__version__ = "0.1.0"
