"""Numbers that more than one part of the package uses. ImageNet's normalisation is timm's
(`timm.data.IMAGENET_DEFAULT_MEAN`, `..._STD`); these are the rest.
"""

GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights (ITU-R 601-2 luma)
