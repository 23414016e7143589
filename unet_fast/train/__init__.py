"""Training and prediction: data sets, augmentation, losses, metrics, the training loop
(`fit`, `unet-fast train`) and overlap-tile prediction (`unet-fast predict`)."""
