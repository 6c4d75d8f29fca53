import sys

from dsa_train.convert.cli import convert_main

sys.exit(convert_main(sys.argv[1:]))
