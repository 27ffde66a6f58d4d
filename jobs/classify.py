"""Entry point for `ray job submit -- python jobs/classify.py --config FILE [--set k=v ...]`.

It joins the cluster named by RAY_ADDRESS (set by `ray job submit`) or starts a local one;
all logic lives in clsjob.
"""
import sys

from clsjob.cli import main

if __name__ == "__main__":
    sys.exit(main(["classify", *sys.argv[1:]]))
