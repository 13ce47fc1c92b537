"""`python -m picomaml.launch` with a stand-in Hub client whose every upload takes longer than the run's collective
timeout (tests/test_distributed.py). Usage, under torchrun:
slow_hub_launch.py RECORD_FILE SECONDS [launch arguments ...]."""
import json
import sys
import time

import huggingface_hub

from picomaml.cli import run_command
from picomaml.launch import main

record, seconds = sys.argv[1], float(sys.argv[2])


class SlowHub:
    "Uploads that take `seconds` each, recorded (branch, when finished) in the record file."
    def __init__(self, *args, **kwargs): pass
    def create_repo(self, repo_id, exist_ok): pass
    def create_branch(self, repo_id, branch, exist_ok): pass
    def upload_folder(self, repo_id, folder_path, path_in_repo, revision, allow_patterns, commit_message):
        time.sleep(seconds)
        with open(record, "a") as f: f.write(json.dumps({"revision": revision, "finished": time.time()}) + "\n")


huggingface_hub.HfApi = SlowHub  # picomaml.checkpoints.upload_checkpoint imports HfApi when it uploads
run_command(main, sys.argv[3:])
