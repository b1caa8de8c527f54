"""What `spd-ext serve` is told, declared as options (the command line derives its flags,
defaults and help from these; the server reads them). Torch-free."""

from __future__ import annotations

from dataclasses import dataclass

from spd_ext.backend_names import SPD_EXT, TP_BACKENDS
from spd_ext.utils.options import option


@dataclass
class ServeOptions:
    checkpoint: str | None = option(None, "an spd_ext checkpoint (ckpt.pt of spd-ext "
                                    "experiment, or model.pt of spd-ext train)")
    hf: str | None = option(None, "a local Hugging Face GPT-2 folder (config.json + weights)")
    pattern: str | None = option(None, "sync pattern to serve with (default: the "
                                 "checkpoint's; tp*L for --hf)")
    nproc: int = option(2, "ranks = pipeline stages x tensor-parallel size", low=1)
    pp: int = option(1, "pipeline stages: the model's blocks split over pp groups of "
                     "nproc / pp tensor-parallel ranks, activations passing stage to stage",
                     low=1)
    host: str = option("127.0.0.1", "interface to listen on (0.0.0.0: every interface; the "
                       "server has no authentication)")
    port: int = option(5050, "TCP port to listen on", low=1, high=65535)
    backend: str = option(SPD_EXT, "the tensor-parallel all-reduce: spd_ext.comm or "
                          "torch.distributed", choices=TP_BACKENDS)
    max_queue: int = option(64, "requests waiting or running before new ones get 503", low=1)
    fail_grace_s: float = option(3.0, "seconds to keep answering 503 after a rank dies (or a "
                                 "second SIGINT/SIGTERM), before exiting 1", low=0.0,
                                 flag="--fail-grace")
    # The ranks' process-group timeout: a collective that waits this long means a rank
    # stopped answering. An idle server's ranks never wait that long (the first rank's
    # keepalives); the job itself has no deadline.
    rank_timeout_s: float = option(300.0, "seconds a rank may stop answering (hung, not dead: "
                                   "a dead one is found at once) before the server stops, "
                                   "idle or generating; it also bounds how far apart the "
                                   "ranks may finish loading the model", low=1.0, high=1e7,
                                   flag="--rank-timeout")
