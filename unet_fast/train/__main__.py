"""python -m unet_fast.train ARGS (= unet-fast train ARGS), for torchrun:

torchrun --nproc_per_node 2 -m unet_fast.train --sync-bn ...
"""

import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
