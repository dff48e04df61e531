"""The PyTorch backends: ``eager`` (the package's model as it is, on any device) and ``cudagraph``
(the same model captured as CUDA graphs, one per batch-size bucket, on a CUDA device)."""

from __future__ import annotations

import torch

from medpipe.infer.backends import Backend, LoadContext


class EagerBackend(Backend):
    """The eval-mode PyTorch model, channels-last, on the Predictor's device."""

    name = "eager"

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model, self.device = model, device

    @classmethod
    def load(cls, ctx: LoadContext) -> "EagerBackend":
        return cls(ctx.model, ctx.device)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.device).contiguous(memory_format=torch.channels_last)).float().cpu()

    def describe(self) -> dict:
        return {"backend": self.name, "runtime": f"torch {torch.__version__}", "device": str(self.device)}


class CudaGraphRunner:
    """The eval-mode model captured as one CUDA graph per batch-size bucket (1, 2, 4, ..., max_batch).

    A replay launches the whole network at once, where eager PyTorch launches several hundred kernels
    one after another from Python; DenseNet121 at small batches is launch-bound on a GPU. A batch is
    padded up to its bucket (rows are independent in eval mode); larger batches run in chunks. All
    graphs share one memory pool; inputs are copied into static buffers, outputs copied out.
    """

    def __init__(self, model: torch.nn.Module, image_size: int, device: torch.device, max_batch: int = 16):
        self.buckets = sorted({min(2 ** k, max_batch) for k in range(max_batch.bit_length() + 1)})
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, tuple] = {}
        side = torch.cuda.Stream(device)
        for bs in reversed(self.buckets):  # largest first: the shared pool is sized once
            inp = torch.zeros(bs, 3, image_size, image_size, device=device).contiguous(
                memory_format=torch.channels_last)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side), torch.no_grad():
                for _ in range(2):  # warm-up outside capture (cuDNN handles, workspaces)
                    model(inp)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.no_grad(), torch.cuda.graph(graph, pool=self.pool):
                out = model(inp)
            self.graphs[bs] = (graph, inp, out)
        torch.cuda.synchronize(device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        outs, top = [], self.buckets[-1]
        for i in range(0, len(x), top):
            chunk = x[i:i + top]
            n = len(chunk)
            graph, inp, out = self.graphs[next(b for b in self.buckets if b >= n)]
            inp[:n].copy_(chunk)
            if n < len(inp):
                inp[n:].zero_()
            graph.replay()
            outs.append(out[:n].float().cpu())
        return torch.cat(outs)


class CudaGraphBackend(Backend):
    """CUDA graphs of the eager model (:class:`CudaGraphRunner`), captured at load."""

    name = "cudagraph"

    def __init__(self, runner: CudaGraphRunner):
        self.runner = runner

    @classmethod
    def load(cls, ctx: LoadContext) -> "CudaGraphBackend":
        return cls(CudaGraphRunner(ctx.model, ctx.meta.preprocessing.image_size, ctx.device,
                                   max(1, int(ctx.max_batch))))

    def run(self, x: torch.Tensor) -> torch.Tensor:
        return self.runner(x)

    def describe(self) -> dict:
        return {"backend": self.name, "runtime": f"torch {torch.__version__} CUDA graphs",
                "buckets": list(self.runner.buckets)}
