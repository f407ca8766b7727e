"""``python -m image_batch_client ...``: the same command as ``image-batch-client``."""

import sys

from image_batch_client.cli import main

sys.exit(main())
