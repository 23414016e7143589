"""Training and prediction: data sets, augmentation, losses, metrics, the training loop
(`fit`, `unet-fast train`) and overlap-tile prediction (`unet-fast predict`).

Imports point one way: symmetry, tiling, images, synthetic, losses, metrics, distributed and
run_folder import nothing of train; data, augment, checkpoint, offset, validate and predict
build on them; fit on those; main (`unet-fast train`) and predict_files (`unet-fast predict`)
on top.
"""
