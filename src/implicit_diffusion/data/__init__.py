"""Built-in data sets (offline): 2-D synthetic targets and scikit-learn's bundled digits."""

from .builtin import TWO_D_DATASETS, load_digits_images, two_d_dataset

__all__ = ["TWO_D_DATASETS", "load_digits_images", "two_d_dataset"]
