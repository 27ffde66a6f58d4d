"""Entry point for `ray job submit -- python jobs/distill.py --config FILE [--set k=v ...]`.

It joins the cluster named by RAY_ADDRESS (set by `ray job submit`) or starts a local one;
all logic lives in clsjob. Exit 2 when the student misses the gate (a rerun resumes).
"""
import sys

from clsjob.cli import main

if __name__ == "__main__":
    sys.exit(main(["distill", *sys.argv[1:]]))
