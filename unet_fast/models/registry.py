"""The trainable model classes by their command-line names: what `unet-fast train --model`
builds and what a checkpoint's model entry is rebuilt from, kept in one place so the two agree."""

from .unet import UNet
from .variants import AttentionUNet, ResUNet, UNetPlusPlus

MODELS = {"unet": UNet, "attention_unet": AttentionUNet, "resunet": ResUNet, "unet++": UNetPlusPlus}
