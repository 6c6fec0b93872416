import sys

from gpt2ipu.cli import main

sys.exit(main())
