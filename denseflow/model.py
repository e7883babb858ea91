"""DenseFlow: the whole model assembled from a :class:`~denseflow.config.ModelConfig` (spec §3).

Data -> latent::

    x (integers) -> dequantization -> z in (0,1) -> z − 0.5 -> squeeze
      -> dense block 1 -> transition 1 -> dense block 2 -> … -> dense block S -> base Gaussian

``log p̂(x) = Σ delta_logp + log p_base(z_L)`` is a single-sample lower bound on ``log P(x)``
over the dequantization and cross-unit noises (spec §10); :meth:`DenseFlow.iwbo` tightens it
by importance weighting (spec §11).

BatchNorm inside the coupling nets makes training-mode values depend on the rest of the batch;
call ``model.eval()`` before evaluating or sampling, as the official scripts do (the density
is only well defined in eval mode). No method here changes the mode, except :meth:`data_init`
which runs in training mode and restores the previous mode.
"""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import ModelConfig, RunConfig
from .nets.recompute import Recomputable
from .nets.runner import NetRunner
from .transforms.base import DiagonalGaussian, Noise, capturing
from .transforms.cross_unit import InvertibleDenseBlock, coupling_net_factory
from .transforms.dequantization import UniformDequantization, VariationalDequantization
from .transforms.glow import ActNorm, Conv1x1, batched_log_dets, squeeze, unsqueeze
from .transforms.transition import Transition

NoiseArg = Mapping[str, Tensor] | None


def positive_int(value: object, name: str) -> int:
    """``value`` as an int >= 1: a Python, numpy or 0-d torch integer (``operator.index``); a
    ValueError naming ``name`` for anything else (bool, float, None, a string, ...)."""
    try:
        number = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        number = None
    if number is None or number < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return number


def draw_counts(k: int | Sequence[int]) -> list[int]:
    """:meth:`DenseFlow.iwbo`'s ``k``, one count or a non-empty sequence of them, as ints."""
    ks = list(k) if isinstance(k, Sequence) and not isinstance(k, str) else [k]
    if not ks:
        raise ValueError("k must be a positive integer or a non-empty sequence of them, got []")
    return [positive_int(j, "k") for j in ks]


def eager() -> AbstractContextManager:
    """Run ``torch.compile``-d code eagerly inside this block (no tracing, no recompilation)."""
    return torch.compiler.set_stance("force_eager")


class DenseFlow(nn.Module):
    """Densely connected normalizing flow (Grcić, Grubišić, Šegvić, NeurIPS 2021).

    Inputs are integer images ``(B, C, H, W)`` with values ``0 .. 2**num_bits − 1``; every
    estimate is per sample, shape ``(B,)``, in nats (or bits/dim). ``noise`` maps the names of
    :attr:`noise_names` to standard-normal tensors; names not given are drawn fresh, from
    ``generator`` where one is passed.
    """

    def __init__(self, config: ModelConfig) -> None:
        if not isinstance(config, ModelConfig):
            raise TypeError(
                f"config: expected a ModelConfig (model_config('cifar10'), ModelConfig(...) or "
                f"ModelConfig.from_dict(values)), got {type(config).__name__}"
            )
        super().__init__()
        self.config = config
        cfg = config
        c, h, w = cfg.image_shape
        if cfg.dequantization == "variational":
            self.dequantizer = VariationalDequantization(
                c,
                num_bits=cfg.num_bits,
                width=cfg.dequant_width,
                steps=cfg.dequant_steps,
                depth=cfg.dequant_depth,
                growth=cfg.dequant_growth,
                context_growth=cfg.dequant_context_growth,
                conv1x1=cfg.conv1x1,
            )
        else:
            self.dequantizer = UniformDequantization(cfg.num_bits)
        channels, h, w = 4 * c, h // 2, w // 2
        self.blocks = nn.ModuleList()
        self.transitions = nn.ModuleList()
        self.latent_shapes: dict[str, tuple[int, int, int]] = {}
        for s in range(cfg.num_scales):
            nets = coupling_net_factory(
                width=cfg.layer_mid_chnls[s],
                depth=cfg.dense_depth,
                growth=cfg.dense_growth,
                attention=cfg.attention,
                heads=cfg.attention_heads,
                landmarks=cfg.attention_landmarks,
                kind=cfg.coupling_net,
            )
            block = InvertibleDenseBlock(
                channels,
                units=cfg.block_conf[s],
                steps=cfg.layers_conf[s],
                growth=cfg.growth_rate,
                net_factory=nets,
                name=f"block{s + 1}",
                conv1x1=cfg.conv1x1,
                conditional=cfg.cross_unit == "conditional",
            )
            self.blocks.append(block)
            channels = block.out_channels
            if s < cfg.num_scales - 1:
                transition = Transition(f"transition{s + 1}")
                self.transitions.append(transition)
                channels, h, w = 2 * channels, h // 2, w // 2
                self.latent_shapes[transition.name] = (channels, h, w)
        self.latent_shapes["base"] = (channels, h, w)
        self.base = DiagonalGaussian(channels)
        self._batched_convs: list[Conv1x1] = []  # set_batched_log_dets

    # ------------------------------------------------------------------ noise and input checks
    @property
    def noise_names(self) -> list[str]:
        """Every name a ``noise`` dict may hold: likelihood draws, then sampling draws."""
        couplings = [f"{c.name}.eta" for block in self.blocks for c in block.couplings]
        sampling = ["base.eta", *(f"{t.name}.eta" for t in reversed(self.transitions))]
        return ["dequant.eta", *couplings, *sampling]

    @property
    def sampling_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per image, the shape of each noise :meth:`sample` draws: ``base.eta``, then each
        transition's ``transition{t}.eta`` (the factored-out halves)."""
        shapes = {"base.eta": self.latent_shapes["base"]}
        return shapes | {f"{t.name}.eta": self.latent_shapes[t.name] for t in self.transitions}

    def _noise(
        self, noise: NoiseArg, generator: torch.Generator | None, temperature: float = 1.0
    ) -> Noise:
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator: expected a torch.Generator or None, got {type(generator).__name__}"
            )
        unknown = sorted(set(noise or {}) - set(self.noise_names))
        if unknown:
            raise ValueError(
                f"unknown noise name(s) {unknown}; this model draws {self.noise_names}"
            )
        return Noise(noise, generator, temperature)

    def _check_images(self, x: Tensor, name: str = "x") -> None:
        top = 2**self.config.num_bits - 1
        if (
            not isinstance(x, Tensor)
            or x.dtype.is_floating_point
            or x.dtype.is_complex
            or x.dtype == torch.bool
        ):
            raise TypeError(
                f"{name}: expected an integer tensor of images (pixel values 0 .. {top}, not "
                f"scaled), got {getattr(x, 'dtype', type(x))}"
            )
        if x.dim() != 4 or tuple(x.shape[1:]) != self.config.image_shape or not len(x):
            raise ValueError(
                f"{name}: expected shape (B, {', '.join(map(str, self.config.image_shape))}) with "
                f"B >= 1, got {tuple(x.shape)}"
            )
        if capturing(x):
            return  # the graphs check the values before they copy them into their buffers
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > top:
            raise ValueError(
                f"{name}: values must lie in 0 .. {top} for num_bits={self.config.num_bits}, "
                f"got {lo} .. {hi}"
            )

    # ------------------------------------------------------------------ data -> latent
    def _forward(
        self,
        x: Tensor,
        noise: Noise,
        dtype: torch.dtype | None = None,
        terms: dict[str, Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """(log p̂(x), latents): the estimate and every factored-out and final latent, computed
        in ``dtype`` (default: the parameters'; every step follows the dequantizer's output).
        ``terms``: filled with the summands of the estimate (see :meth:`elbo_terms`)."""
        self._check_images(x)
        with batched_log_dets(self._batched_convs) if self._batched_convs else nullcontext():
            return self._flow(x, noise, dtype, {} if terms is None else terms)

    def _flow(
        self, x: Tensor, noise: Noise, dtype: torch.dtype | None, terms: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        latents: dict[str, Tensor] = {}
        z, total = self.dequantizer(x, noise=noise, dtype=dtype)
        terms["dequantization"] = total
        h = squeeze(z - 0.5)
        for s, block in enumerate(self.blocks):
            h, terms[block.name] = block(h, noise=noise)
            total = total + terms[block.name]
            if s < len(self.transitions):
                transition = self.transitions[s]
                h, latents[transition.name], terms[transition.name] = transition.factor_out(h)
                total = total + terms[transition.name]
        latents["base"] = h
        terms["base"] = self.base.log_prob(h)
        return total + terms["base"], latents

    def elbo(
        self, x: Tensor, noise: NoiseArg = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Single-sample ``log p̂(x)`` in nats, ``(B,)`` (spec §10): the training objective."""
        return self._forward(x, self._noise(noise, generator))[0]

    @property
    def term_names(self) -> list[str]:
        """The names of :meth:`elbo_terms`, in its order."""
        names = ["bins", "dequantization"]
        for s, block in enumerate(self.blocks):
            names += [f"{block.name}.steps"] + [f"{block.name}.cross_unit"] * bool(block.couplings)
            names += [self.transitions[s].name] if s < len(self.transitions) else []
        return [*names, "base"]

    @torch.inference_mode()
    def elbo_terms(
        self, x: Tensor, noise: NoiseArg = None, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """:meth:`elbo` split by where each summand arises: in nats, each ``(B,)``, in the order
        of the pass; the same draws as :meth:`elbo` with the same ``noise`` and ``generator``,
        and their sum is its value to float rounding.

        ``bins``: −D·bits·log 2, the bins' width (exactly ``num_bits`` bits per dimension);
        ``dequantization``: −log q(u | x), of the dequantization noise given the image;
        ``block{s}.steps``: the log-determinants of block s's glow-like steps;
        ``block{s}.cross_unit``: −log q(ẽ | context) of the noise channels its cross-unit
        couplings append (absent without augmentation, ``growth_rate=0``);
        ``transition{t}``: log N(0, I) of the half factored out after block t;
        ``base``: the base density of the final latent.
        """
        summands: dict[str, Tensor] = {}
        parts: dict[str, list[Tensor]] = {}

        def keep(key: str):
            def hook(module, args, out):
                parts.setdefault(key, []).append(out[1])

            return hook

        hooks = [
            module.register_forward_hook(keep(f"{block.name}.{kind}"))
            for block in self.blocks
            for kind, modules in (("steps", block.units), ("cross_unit", block.couplings))
            for module in modules
        ]
        try:
            with eager():
                self._forward(x, self._noise(noise, generator), terms=summands)
        finally:
            for hook in hooks:
                hook.remove()
        width = self.config.num_dims * self.config.num_bits * math.log(2)
        bins = torch.full_like(summands["dequantization"], -width)
        terms = {}
        for name in self.term_names:
            if name == "bins":
                terms[name] = bins
            elif name == "dequantization":
                terms[name] = summands[name] - bins
            elif name in parts:  # a block's steps or cross-unit couplings
                terms[name] = torch.stack(parts[name]).sum(0)
            else:
                terms[name] = summands[name]
        return terms

    def forward(
        self, x: Tensor, noise: NoiseArg = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """``model(x)`` is :meth:`elbo` (what DistributedDataParallel wraps)."""
        return self.elbo(x, noise, generator)

    def bits_per_dim(
        self, x: Tensor, noise: NoiseArg = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """``−log p̂(x) / (D·ln 2)`` per sample, ``(B,)``; D counts data dimensions only."""
        return -self.elbo(x, noise, generator) / (self.config.num_dims * math.log(2))

    @torch.inference_mode()
    def iwbo(
        self,
        x: Tensor,
        k: int | Sequence[int],
        chunk: int | None = None,
        generator: torch.Generator | None = None,
        elbo: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """Importance-weighted bound ``log (1/k) Σ_j exp(log p̂_j(x))`` in nats, ``(B,)`` (spec §11).

        ``k`` independent draws of every noise; ``chunk`` copies of the batch go through the
        model per pass (default: all ``k`` at once). No autograd graph is built. ``elbo`` scores
        the copies of a pass (default: :meth:`elbo` drawing from ``generator``;
        :class:`denseflow.graph.GraphedInference` passes its replayed one).
        ``k`` a sequence (e.g. ``[1, 10, 100]``): ``(len(k), B)``, row ``i`` the bound of the first
        ``k[i]`` of ``max(k)`` draws — the bound's tightening with k from one run of ``max(k)``.
        """
        self._check_images(x)
        ks = draw_counts(k)
        total = max(ks)
        chunk = total if chunk is None else positive_int(chunk, "chunk")
        b = x.shape[0]
        elbo = elbo or (lambda copies: self.elbo(copies, generator=generator))
        weights = []
        for start in range(0, total, chunk):
            n = min(chunk, total - start)
            weights.append(elbo(x.repeat(n, 1, 1, 1)).view(n, b))
        log_w = torch.cat(weights)
        bounds = [torch.logsumexp(log_w[:j], dim=0) - math.log(j) for j in ks]
        return torch.stack(bounds) if isinstance(k, Sequence) else bounds[0]

    def encode(
        self,
        x: Tensor,
        noise: NoiseArg = None,
        generator: torch.Generator | None = None,
        exact: bool = True,
    ) -> dict[str, Tensor]:
        """Latents of ``x`` for one draw of the noises: ``{"transition1": …, …, "base": z_L}``.

        ``exact=True`` (default): computed and returned in float64 whatever the model's dtype
        (each step casts its parameters up for the call; the model is not changed), so that
        :meth:`decode` gives ``x`` back bit for bit. The noises are the draws the float32 pass
        takes (drawn in float32, then cast), so these are the latents of the forward pass
        :meth:`elbo` runs, to float32 rounding. Compiled networks run eagerly here. Both
        directions need float64: float32 latents decoded in float64 still lose pixels (fewer).
        MPS has no float64: pass ``exact=False`` there.

        ``exact=False``: the model's dtype, bitwise the forward pass :meth:`elbo` runs. In float32
        the round trip is not exact on a full-size model: rounding in the affine couplings and
        1x1 convolutions, amplified through the coupling networks over the 74 steps each way,
        moves the reconstructed ``z`` by up to ~0.05 of a level on a random DenseFlow-74-10, and
        a pixel whose dequantized value lies closer than that to a bin edge comes back one level
        off (16 to 30 of 12,288 pixels per four images, ``tests/test_official.py``). Float64
        leaves ~1e-10 of a level. Cost of float64 on a CPU: encode and decode each ~4x the
        float32 time for DenseFlow-74-10 (~3x for the demo model), nearly all of it float64
        convolutions, which have no oneDNN kernel (``docs/paper_map.md``, "Numerical health").
        """
        dtype = torch.float64 if exact else None
        with eager() if exact else nullcontext():
            return self._forward(x, self._noise(noise, generator), dtype)[1]

    # ------------------------------------------------------------------ latent -> data
    def _invert(self, z: Tensor, noise: Noise, quantize: bool) -> Tensor:
        """Latent -> data in ``z``'s dtype: the factored-out halves are drawn from ``noise``."""
        for s in reversed(range(len(self.blocks))):
            z = self.blocks[s].inverse(z)
            if s > 0:
                z = self.transitions[s - 1].inverse(z, noise=noise)
        z = unsqueeze(z) + 0.5
        return self.dequantizer.inverse(z) if quantize else z

    @torch.inference_mode()
    def decode(
        self, latents: Mapping[str, Tensor], quantize: bool = True, exact: bool = True
    ) -> Tensor:
        """Inverse of :meth:`encode`: integer images, or with ``quantize=False`` the continuous
        ``z = (x + u) / 2**num_bits`` in (0, 1). Cross-unit noise channels are dropped.

        ``exact=True`` (default): computed in float64 (latents and, per step, parameters cast
        up), so ``decode(encode(x)) == x`` bit for bit: a pixel could only be lost if its
        dequantized value lay within ~1e-10 of a level of a bin edge. Latents not computed in
        float64 (``encode(..., exact=False)``, or a float32 pass of your own) decode in float64
        too, but only as exactly as their own rounding allows. ``exact=False``: the model's
        dtype, the path :meth:`sample` takes (see :meth:`encode` for what float32 misses).
        """
        missing = sorted(set(self.latent_shapes) - set(latents))
        if missing:
            raise ValueError(f"latents: missing {missing}; expected {list(self.latent_shapes)}")
        dtype = torch.float64 if exact else self.base.loc.dtype
        noise = Noise({f"{t.name}.eta": latents[t.name] for t in self.transitions})
        with eager() if exact else nullcontext():
            return self._invert(latents["base"].to(dtype), noise, quantize)

    @torch.inference_mode()
    def sample(
        self,
        n: int,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        noise: NoiseArg = None,
        quantize: bool = True,
    ) -> Tensor:
        """``n`` integer images ``(n, C, H, W)`` (spec §12); with ``quantize=False`` the
        continuous ``z`` the integers are read from (``floor(z·2**num_bits)``, clamped; a NaN,
        e.g. at an enormous temperature, reads 0).

        ``z_L = μ + σ·T·η``, each factored-out half ``T·η``; the dequantizer and the noise nets
        are not used. The official code samples at ``T = 1``.
        """
        n = positive_int(n, "sample: n")
        if not temperature >= 0:
            raise ValueError(f"sample: temperature must be >= 0, got {temperature!r}")
        if temperature == math.inf:
            raise ValueError("sample: temperature must be finite, got inf")
        noise_ = self._noise(noise, generator, temperature)
        eta = noise_.draw("base.eta", (n, *self.latent_shapes["base"]), like=self.base.loc)
        return self._invert(self.base.sample(noise_.temperature * eta), noise_, quantize)

    def save_pretrained(
        self,
        folder: str | os.PathLike,
        config: RunConfig | None = None,
        batchnorm: str | None = None,
    ) -> Path:
        """``folder/config.json`` + ``folder/model.safetensors`` (the Hugging Face layout), with
        ``config`` (the run configuration; default: this model's with the default recipe)."""
        from .checkpoint import RUNNING_STATISTICS
        from .pretrained import save_pretrained

        return save_pretrained(folder, self, config, batchnorm or RUNNING_STATISTICS)

    @classmethod
    def from_pretrained(
        cls, source: str | os.PathLike, device: str | torch.device = "cpu"
    ) -> DenseFlow:
        """A model in eval mode from a published name (``"fashion-mnist"``), a
        :meth:`save_pretrained` folder, a run folder, a checkpoint file, or a Hugging Face Hub
        repository id (with ``huggingface_hub`` installed); see :mod:`denseflow.pretrained`."""
        from .pretrained import open_model

        return open_model(source, device)[0]

    def set_low_memory(self, enabled: bool = True) -> DenseFlow:
        """Recompute every affine coupling (with its network), noise net and the dequantizer's
        context net in the backward pass instead of storing their activations (activation
        checkpointing): identical values and gradients, a fraction of the activation memory,
        about one more forward pass per step."""
        for module in self.modules():
            if isinstance(module, Recomputable):
                module.low_memory = enabled
        return self

    def set_batched_log_dets(self, enabled: bool = True) -> DenseFlow:
        """Compute the full 1x1 convolutions' log-determinants of each likelihood pass up front,
        one batched factorisation per matrix size, instead of one per convolution
        (:func:`~denseflow.transforms.glow.batched_log_dets`; ``train.batched_logdets``)."""
        convs = [m for m in self.modules() if type(m) is Conv1x1]
        self._batched_convs = convs if enabled else []
        return self

    def set_net_precision(self, dtype: torch.dtype | None = torch.bfloat16) -> DenseFlow:
        """Run the coupling, noise and dequantizer networks under autocast to ``dtype`` (None:
        float32); everything else, log-determinants and densities included, stays float32."""
        for module in self.modules():
            if isinstance(module, NetRunner):
                module.net_dtype = dtype
        return self

    def compile_nets(self, **options) -> DenseFlow:
        """``torch.compile`` every network the steps call (options as ``torch.compile``'s).

        A net that low-memory mode checkpoints itself (the noise nets, the dequantizer's context
        net) has its inner computation compiled, so checkpointing stays outside the graph.
        Nets of one class and shape share a compiled graph; each distinct shape is one
        recompilation of the same code, so while a compiled net runs dynamo's recompile limit is
        raised to four per net (at its default of 8 the later scales would silently fall
        back to eager); the process-wide setting is left as it was (:mod:`denseflow.nets.runner`).
        """
        runners = [module for module in self.modules() if isinstance(module, NetRunner)]
        nets = [
            net
            for module in runners
            for net in (getattr(module, "net", None), getattr(module, "context_net", None))
            if net is not None
        ]
        for net in nets:
            if isinstance(net, Recomputable):  # compile what low-memory mode checkpoints
                net._compute = torch.compile(net._compute, **options)
            else:
                net.compile(**options)
        for module in runners:  # per net: training, recomputation, evaluation, sampling graphs
            module.recompile_limit = 4 * len(nets)
        return self

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def data_init(
        self, x: Tensor, noise: NoiseArg = None, generator: torch.Generator | None = None
    ) -> None:
        """Data-dependent ActNorm initialisation from the batch ``x`` (spec §6.1).

        One forward pass in training mode (BatchNorm on batch statistics, as the official first
        training step) in which every ActNorm is set from its own input before applying it.
        BatchNorm running statistics and the model's mode are left as they were.
        """
        buffers = {name: b.clone() for name, b in self.named_buffers()}
        hooks = [
            m.register_forward_pre_hook(lambda module, args: module.initialize(args[0]))
            for m in self.modules()
            if isinstance(m, ActNorm)
        ]
        was_training = self.training
        try:
            self.train()
            with (
                eager()
            ):  # one pass: not worth compiling (compiled nets would trace a no-grad graph)
                self.elbo(x, noise, generator)
        finally:
            for hook in hooks:
                hook.remove()
            self.train(was_training)
            for name, b in self.named_buffers():
                b.copy_(buffers[name])
