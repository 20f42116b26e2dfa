"""LightningModules and LightningCLI entry points, one per task (classification, segmentation, face)."""
