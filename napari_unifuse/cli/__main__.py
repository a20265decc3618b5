import sys

from napari_unifuse.cli import main

sys.exit(main())
