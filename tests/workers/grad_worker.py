"""Run under torchrun: one step of a two-group stage with unequal batches; rank 0 saves full gradients + batches."""
import sys

import torch
import torch.distributed as dist

from radio_scale.config import load_config
from radio_scale.distributed.env import init_distributed, shutdown
from radio_scale.train.trainer import Trainer


def mesh_shape(model) -> tuple:
    """The device mesh the student's first block is sharded on (() when it is a plain module)."""
    p = next(model.student.blocks[0].parameters())
    mesh = getattr(p, "device_mesh", None) if hasattr(p, "full_tensor") else None
    return tuple(mesh.shape) if mesh is not None else ()


def main(out: str, run_dir: str, overrides: list[str]) -> None:
    cfg = load_config("smoke", overrides)
    env = init_distributed(timeout_s=120)
    trainer = Trainer(cfg, env, run_dir)
    trainer._enter_stage(1)  # the stage with two teacher groups
    batches = {g.name: next(trainer._iters[g.name]) for g in trainer.stage.groups}
    stats = trainer.train_step(batches=batches, apply=False)
    grads = trainer.backend.full_grads()
    normal = {g: b.normalized() for g, b in batches.items()}  # the loader's uint8 views, as the trainer sees them
    mine = {g: {"student": b.student, "teachers": b.teachers, "content": b.content} for g, b in normal.items()}
    everyone = [None] * env.world_size
    dist.all_gather_object(everyone, mine)
    if env.rank == 0:
        torch.save({"grads": grads, "batches": everyone, "loss": stats.loss, "terms": stats.terms,
                    "checkpointing": [blk.checkpointing for blk in trainer.model.student.blocks],
                    "sharding": trainer.student_sharding, "mesh": mesh_shape(trainer.model)}, out)
    trainer.stage.close()
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
