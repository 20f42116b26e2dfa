"""LightningDataModules for ImageNet, Cityscapes and face data, and the embedded demo-data generators."""
