"""``spine-node train junction``: the lumbosacral junction classifier (:mod:`pipeline.junction`)."""
from __future__ import annotations

from pathlib import Path

import typer

from dicom_node.commands import train_options as o
from pipeline.junction.train_config import JunctionTrainConfig as C

_D = C()


def register(train_app: typer.Typer) -> None:
    @train_app.command("junction")
    def junction(
        data: Path = typer.Option(Path(_D.data), exists=True, file_okay=False,
                                  help="The real-spine pack: its train-side masks are synthesised."),
        synth_seed: int = typer.Option(_D.synth_seed, help="Synthesis seed of the training volumes."),
        synth_cases: int = typer.Option(_D.synth_cases, min=1, help="Synthesised training volumes."),
        myelography: float = typer.Option(_D.myelography, min=0.0, max=1.0,
                                          help="Share of the synthesised volumes (training and "
                                               "validation) with contrast in the spinal canal."),
        phantom_seeds: str = typer.Option(_D.phantom_seeds, help="Phantom seeds added to them."),
        real_subjects: str = typer.Option(_D.real_subjects,
                                          help="Real CTs added: 'train' (the split's train side), "
                                               "subjects separated by commas, or '' for none."),
        real_repeat: int = typer.Option(_D.real_repeat, min=1,
                                        help="Each real query point counts this many times."),
        val_synth_seed: int = typer.Option(_D.val_synth_seed,
                                           help="Synthesis seed of the validation volumes."),
        val_synth_cases: int = typer.Option(_D.val_synth_cases, min=1,
                                            help="Synthesised validation volumes."),
        steps: int = typer.Option(_D.steps, min=1, help="Training steps (batches)."),
        batch: int = typer.Option(_D.batch, min=1, help="Crops per batch."),
        lr: float = typer.Option(_D.lr, help="Learning rate (Adam, cosine annealing)."),
        width: int = typer.Option(_D.width, min=1, help="Channels of the first stage."),
        val_every: int = typer.Option(_D.val_every, min=1, help="Validate every N steps."),
        out: Path = typer.Option(Path(_D.out), help="Run directory (best.pt, report.json)."),
        cache: Path = typer.Option(Path(_D.cache), help="Cache of the 4 mm volumes."),
        seed: int = o.seed_opt(C),
        threads: int = typer.Option(_D.threads, min=1, help="Torch CPU threads."),
        device: str = typer.Option(_D.device, help="cpu | cuda."),
        install: bool = o.install_opt(),
    ) -> None:
        """Train the junction classifier on volumes synthesised from the train-side masks and on
        phantoms; its threshold is chosen on volumes synthesised with another seed."""
        from pipeline.junction.train import install as install_weights
        from pipeline.junction.train import train

        cfg = C(data=str(data), synth_seed=synth_seed, synth_cases=synth_cases,
                myelography=myelography,
                phantom_seeds=phantom_seeds, real_subjects=real_subjects,
                real_repeat=real_repeat, val_synth_seed=val_synth_seed,
                val_synth_cases=val_synth_cases, steps=steps, batch=batch, lr=lr, width=width,
                val_every=val_every, out=str(out), cache=str(cache), seed=seed, threads=threads,
                device=device)
        o.run_training(train, install_weights, cfg, install)
