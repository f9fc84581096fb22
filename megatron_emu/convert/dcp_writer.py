"""Write one DCP checkpoint group by group, so an import never holds the whole model.

`dcp.save` needs every tensor of a checkpoint in one state dict (its file writer even
keeps each file's tensors referenced until the file is closed). Here each group (about
one --max-shard-size of tensors) is saved by its own `dcp.save` into a scratch folder;
`finish` moves every group's data file into the checkpoint directory under a distinct
name and writes one `.metadata` that indexes them all. The result is an ordinary DCP
checkpoint: `dcp.load`, our Checkpointer and DCPSource read it like any other.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
import warnings

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata


class GroupedDCPWriter:
    def __init__(self, directory: str):
        self.directory = directory
        self.groups: list[str] = []
        os.makedirs(directory, exist_ok=True)

    def write(self, state: dict) -> None:
        """Save one group now (nested dicts as for dcp.save); its tensors can be freed after."""
        scratch = os.path.join(self.directory, f".group{len(self.groups)}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
            dcp.save(state, storage_writer=dcp.FileSystemWriter(scratch, thread_count=1), no_dist=True)
        self.groups.append(scratch)

    def finish(self) -> None:
        """One .metadata over every group's data file; the scratch folders are removed."""
        merged = Metadata(state_dict_metadata={}, planner_data={}, storage_data={})
        for i, scratch in enumerate(self.groups):
            metadata = dcp.FileSystemReader(scratch).read_metadata()
            renamed = {}
            for name in sorted(os.listdir(scratch)):
                if name.endswith(".distcp"):
                    renamed[name] = f"__0_{i}_{len(renamed)}.distcp"
                    os.rename(os.path.join(scratch, name), os.path.join(self.directory, renamed[name]))
            repeated = merged.state_dict_metadata.keys() & metadata.state_dict_metadata.keys()
            if repeated:
                raise ValueError(f"{self.directory}: {sorted(repeated)[0]} was written twice (given by two inputs?)")
            merged.state_dict_metadata.update(metadata.state_dict_metadata)
            merged.planner_data.update(metadata.planner_data or {})
            merged.storage_data.update({index: dataclasses.replace(info, relative_path=renamed[info.relative_path])
                                        for index, info in metadata.storage_data.items()})
            merged.version = metadata.version
            shutil.rmtree(scratch)
        tmp = os.path.join(self.directory, ".metadata.tmp")
        with open(tmp, "wb") as f:
            pickle.dump(merged, f)  # what FileSystemWriter.finish writes
        os.replace(tmp, os.path.join(self.directory, ".metadata"))
