"""The agent: how the checks call the learner's code and get plain data back.

`course_tools.checking` runs an exercise's checks; this module is the only place where they meet the
learner's objects. A check sends a request (call a function or method, read an attribute,
describe an object, call and backpropagate); the agent serves it against the learner's namespace
and answers with data only: numbers, strings, tensors, numpy arrays, lists, tuples and dicts of
them, or a handle for any other object, which later requests can name as a `Ref`.

Requests and answers always make a round trip through bytes (`dumps`/`loads`: read back with
``torch.load(weights_only=True)``, which runs no code, and rebuilt from checked tensors within a
budget, since the bytes may be forged), so:
- the learner's code works on copies and cannot change the checks' reference values;
- the same checks work whether the learner's objects are in this process (`LocalAgent`, used by a
  notebook's checker cell) or in another one (the grader's sandboxed kernel,
  ``course_tools/grading/executor.py``), where nothing the learner's code does can reach the
  process that computes the score.

Probes are small deterministic test doubles (a denoiser that logs its calls, a network to count,
a seeded generator, a seeded linear layer, the course's models random or shipped, a pipeline with a
new token, a velocity function of flow matching) that the checks ask the agent to build on the learner's side.
"""

from __future__ import annotations

import contextlib
import io
import signal
import threading
import time
import traceback
import warnings
import zipfile
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

MAX_WIRE_BYTES = 64 * 2**20  # largest request or answer accepted (a memory-bomb guard)
MAX_TENSOR_BYTES = 2 * MAX_WIRE_BYTES  # all tensors of one message together, once copied
MAX_NODES = 1_000_000  # items (numbers, strings, tensors, containers) in one message
WIRE_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64,
                         torch.complex128, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool})


class _CallTimeout(BaseException):
    """Raised inside the learner's code by the local agent's alarm (BaseException: a bare
    ``except Exception`` in the learner's code does not swallow it)."""


# ----------------------------------------------------------------------------------------------
# Data on the wire: what may cross between the learner's code and the checks
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ref:
    """A name in the learner's namespace, or an object the agent keeps, plus an attribute path.

    ``comp.linear_schedule`` on a Ref is another Ref; crossing into the learner's code is always an
    explicit ``run.call(ref, ...)`` or ``run.get(ref)``.
    """

    root: tuple  # ("name", "ScheduleComparator") or ("handle", 7)
    path: tuple = ()
    type_name: str = ""

    def __getattr__(self, name: str) -> "Ref":
        if name.startswith("__"):
            raise AttributeError(name)
        return Ref(self.root, self.path + (name,), self.type_name)

    def label(self) -> str:
        head = self.root[1] if self.root[0] == "name" else f"<{self.type_name or 'object'}>"
        return ".".join([str(head), *self.path])


@dataclass(frozen=True)
class Probe:
    """Ask the agent to build one of the `PROBES` on its side: ``Probe.of("generator", seed=3)``."""

    name: str
    kwargs: tuple = ()  # sorted (key, value) pairs of plain data

    @classmethod
    def of(cls, name: str, **kwargs: Any) -> "Probe":
        return cls(name, tuple(sorted(kwargs.items())))


def to_wire(obj: Any, keep: Callable[[Any], int] | None = None, _depth: int = 0) -> Any:
    """Turn ``obj`` into data that `torch.load(weights_only=True)` can read back.

    Tensors become plain CPU tensors, numpy arrays and scalars are tagged, and anything else is
    kept by the agent (``keep`` returns a handle) and sent as a handle tag.
    """
    if _depth > 20:
        raise ValueError("structure nested more than 20 levels deep")
    t = type(obj)
    if obj is None or t in (bool, int, float, str, bytes):
        return obj
    if t is complex:
        return {"__complex__": (obj.real, obj.imag)}
    if isinstance(obj, torch.Tensor) and obj.layout == torch.strided and not obj.is_nested:
        plain = obj.detach().to("cpu")
        if type(plain) is not torch.Tensor:
            plain = plain.as_subclass(torch.Tensor)
        if plain.is_neg() or plain.is_conj():
            plain = plain.resolve_neg().resolve_conj()
        return plain.clone(memory_format=torch.contiguous_format)  # dense and contiguous: what `loads` accepts
    if isinstance(obj, np.ndarray) and obj.dtype != object:
        return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(obj).copy())}
    if isinstance(obj, np.generic) and not isinstance(obj, np.object_):
        return {"__npscalar__": obj.item(), "dtype": str(obj.dtype)}
    if t in (torch.dtype, torch.Size):
        return obj
    if isinstance(obj, (list, tuple)):  # subclasses (namedtuples) become plain lists and tuples
        items = [to_wire(x, keep, _depth + 1) for x in obj]
        return items if isinstance(obj, list) else tuple(items)
    if isinstance(obj, dict) and all(type(k) in (str, int, float, bool, tuple) for k in obj):
        return {k: to_wire(v, keep, _depth + 1) for k, v in obj.items()}  # OrderedDict -> dict
    if isinstance(obj, Ref):
        return {"__ref__": obj.root, "path": list(obj.path)}
    if isinstance(obj, Probe):
        return {"__probe__": obj.name, "kwargs": dict(obj.kwargs)}
    if keep is None:
        raise TypeError(f"cannot send a {t.__name__}")
    return {"__handle__": keep(obj), "type": _type_name(obj)}


def from_wire(data: Any, resolve: Callable[[dict], Any] | None = None) -> Any:
    """Inverse of `to_wire`. ``resolve`` turns ref/probe/handle tags into objects (agent side);
    without it, handle tags become `Ref` objects (checker side)."""
    t = type(data)
    if t is dict:
        keys = set(data)
        if keys == {"__ndarray__"}:
            return data["__ndarray__"].numpy()
        if keys == {"__npscalar__", "dtype"}:
            dtype = np.dtype(str(data["dtype"]))
            if dtype.kind not in "biufc":
                raise ValueError(f"a numpy scalar of dtype {dtype} cannot travel")
            return dtype.type(data["__npscalar__"])
        if keys == {"__complex__"}:
            return complex(*data["__complex__"])
        if keys in ({"__ref__", "path"}, {"__probe__", "kwargs"}) and resolve is not None:
            return resolve(data)
        if keys == {"__handle__", "type"}:
            if resolve is not None:
                return resolve(data)
            return Ref(("handle", int(data["__handle__"])), (), str(data["type"]))
        return {k: from_wire(v, resolve) for k, v in data.items()}
    if t in (list, tuple):
        items = [from_wire(x, resolve) for x in data]
        return items if t is list else tuple(items)
    return data


def dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def loads(raw: bytes) -> Any:
    """Read bytes written by `dumps` as plain data, trusting nothing in them.

    The bytes may come from a learner's process that forged them, so, in order: their size is
    capped; the archive may hold only uncompressed records no larger than itself (no zip bomb);
    ``torch.load(weights_only=True)`` runs no code; and the result is rebuilt by `checked_copy`:
    only plain containers, numbers, strings and dense tensors of a plain dtype whose storage really
    holds their elements (a stride-0 view of 6e9 elements over one number is refused), copied into
    fresh memory within a budget. The checks compare only that copy.
    """
    if not isinstance(raw, (bytes, bytearray)):
        raise TypeError("a message must be bytes")
    if len(raw) > MAX_WIRE_BYTES:
        raise ValueError(f"a message of {len(raw) / 2**20:.0f} MiB is larger than the limit")
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            for info in archive.infolist():
                if info.compress_type != zipfile.ZIP_STORED or max(info.file_size, info.compress_size) > len(raw):
                    raise ValueError("a message may hold only uncompressed records")
    except zipfile.BadZipFile as err:
        raise ValueError(f"not a message: {err}") from None
    return checked_copy(torch.load(io.BytesIO(raw), weights_only=True))


def checked_copy(obj: Any) -> Any:
    """A copy of ``obj`` made of plain data only (see `loads`); raises ValueError otherwise."""
    budget = {"bytes": MAX_TENSOR_BYTES, "nodes": MAX_NODES}

    def copy_of(x: Any, depth: int) -> Any:
        budget["nodes"] -= 1
        if budget["nodes"] < 0 or depth > 32:
            raise ValueError("a message with too many items, or nested too deeply")
        t = type(x)
        if x is None or t in (bool, int, float, complex, str, bytes, torch.dtype, torch.Size):
            return x
        if t is torch.Tensor:
            return _checked_tensor(x, budget)
        if t in (list, tuple):
            items = [copy_of(v, depth + 1) for v in x]
            return items if t is list else tuple(items)
        if t is dict:
            out = {}
            for k, v in x.items():
                if type(k) not in (str, int, float, bool, tuple):
                    raise ValueError(f"a key of type {type(k).__name__} in a message")
                out[copy_of(k, depth + 1)] = copy_of(v, depth + 1)
            return out
        raise ValueError(f"a {t.__name__} cannot travel in a message")

    return copy_of(obj, 0)


def _checked_tensor(t: torch.Tensor, budget: dict) -> torch.Tensor:
    if t.layout != torch.strided or t.is_quantized or t.is_nested or t.device.type != "cpu":
        raise ValueError("only dense CPU tensors travel")
    if t.dtype not in WIRE_DTYPES:
        raise ValueError(f"a tensor of dtype {t.dtype} cannot travel")
    nbytes = t.numel() * t.element_size()
    budget["bytes"] -= nbytes
    if budget["bytes"] < 0:
        raise ValueError(f"the tensors of a message hold more than {MAX_TENSOR_BYTES // 2**20} MiB")
    if not t.is_contiguous():
        raise ValueError(f"a tensor of shape {tuple(t.shape)} that is not contiguous (strides {t.stride()})")
    if t.untyped_storage().nbytes() < t.storage_offset() * t.element_size() + nbytes:
        raise ValueError(f"a tensor of shape {tuple(t.shape)} larger than its storage")
    return t.detach().clone()


def _type_name(obj: Any) -> str:
    t = obj if isinstance(obj, type) else type(obj)
    mod = getattr(t, "__module__", "") or ""
    name = getattr(t, "__qualname__", t.__name__)
    return name if mod in ("builtins", "__main__") else f"{mod}.{name}"


# ----------------------------------------------------------------------------------------------
# Probes: small deterministic objects the checks hand to the learner's code
# ----------------------------------------------------------------------------------------------
class ProbeDenoiser(torch.nn.Module):
    """A stand-in for a conditional U-Net: eps = tanh(a * x + b(t) + mean-pooled context), with a
    log of every call (batch size and timestep). Deterministic from its seed."""

    def __init__(self, seed: int = 0, channels: int = 4, context_dim: int = 8):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = torch.nn.Parameter(0.5 + torch.rand(channels, generator=g))
        self.proj = torch.nn.Parameter(torch.randn(context_dim, channels, generator=g) * 0.5)
        self.calls: list[tuple[int, float]] = []

    def forward(self, x: torch.Tensor, t: Any, context: torch.Tensor) -> torch.Tensor:
        t_val = float(torch.as_tensor(t).float().flatten()[0])
        self.calls.append((int(x.shape[0]), t_val))
        c = (context.mean(dim=1) @ self.proj)[:, :, None, None]  # (B, C, 1, 1)
        return torch.tanh(self.a[None, :, None, None] * x + c + 1e-3 * t_val)


def probe_network(seed: int = 0, depth: int = 3) -> torch.nn.Module:
    """A small random network (Conv2d, Linear with and without bias, LayerNorm, a frozen
    layer, a buffer) whose parameters the checks count. Its layers are only counted, never run."""
    rng = np.random.default_rng(seed)
    layers: list[torch.nn.Module] = [torch.nn.Conv2d(3, int(rng.integers(2, 9)), int(rng.integers(1, 4)))]
    width = int(rng.integers(4, 40))
    for _ in range(depth):
        nxt = int(rng.integers(4, 40))
        layers += [torch.nn.Linear(width, nxt, bias=bool(rng.integers(0, 2))), torch.nn.LayerNorm(nxt)]
        width = nxt
    layers.append(torch.nn.BatchNorm1d(width))  # running statistics are buffers, not parameters
    net = torch.nn.Sequential(*layers)
    net[0].requires_grad_(False)  # a frozen layer still has parameters
    return net


def probe_generator(seed: int = 0) -> torch.Generator:
    """A CPU torch.Generator seeded by the checks (a generator cannot travel as data)."""
    return torch.Generator().manual_seed(seed)


@contextlib.contextmanager
def _seeded(seed: int):
    """Build modules with torch's default initialisation drawn from ``seed``, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def probe_linear(seed: int = 0, in_features: int = 8, out_features: int = 8, bias: bool = True) -> torch.nn.Linear:
    """An nn.Linear with nn.Linear's own initialisation drawn from ``seed`` (the layer a LoRA layer wraps)."""
    with _seeded(seed):
        return torch.nn.Linear(in_features, out_features, bias=bias)


def probe_unet(seed: int = 0, shipped: bool = False, weights_dir: str | None = None, **config: Any) -> torch.nn.Module:
    """The course's U-Net, frozen and in eval mode: the shipped one (``weights/unet.*``, or ``weights_dir``), or a
    random one of ``UNetConfig(**config)`` initialised from ``seed``."""
    from course_lib.unet import UNet, UNetConfig
    from course_lib.weights import load_unet

    if shipped:
        return load_unet(weights_dir).eval().requires_grad_(False)
    with _seeded(seed):
        return UNet(UNetConfig(**config)).eval().requires_grad_(False)


def probe_text_encoder(seed: int = 0, shipped: bool = False, weights_dir: str | None = None,
                       **config: Any) -> torch.nn.Module:
    """The course's CLIP text tower, frozen and in eval mode: the shipped one, or a random one of
    ``CLIPConfig(**config)`` initialised from ``seed``."""
    from course_lib.clip import CLIPConfig, TextEncoder
    from course_lib.weights import load_clip

    if shipped:
        return load_clip(weights_dir).text.eval().requires_grad_(False)
    with _seeded(seed):
        return TextEncoder(CLIPConfig(**config)).eval().requires_grad_(False)


class ProbeNewToken:
    """Textual inversion's starting point: the shipped tiny SD with the token ``<x>`` added
    (``course_lib.personalize.add_token(sd, "<x>", init="circle")``), its frozen text tower and U-Net, the token
    ids of ``captions`` (which use ``<x>``), and `gradient`, which backpropagates a loss function's value and
    reports the gradient of the new embedding row, the one trainable tensor."""

    TOKEN = "<x>"

    def __init__(self, captions: Sequence[str] = ("a red <x>", "a big blue <x> at the top", "a small green <x>"),
                 weights_dir: str | None = None):
        from course_lib import personalize
        from course_lib.tiny_sd import load_tiny_sd

        sd = load_tiny_sd(weights_dir=weights_dir)
        personalize.add_token(sd, self.TOKEN, init="circle")
        self.text_encoder, self.unet = sd.clip.text, sd.unet
        self.ids = sd.tokenizer(list(captions))  # (B, context_length)
        self._new = personalize.textual_inversion_parameters(sd)[0]  # (1, width)
        self._frozen = [p for p in (*sd.unet.parameters(), *sd.clip.parameters()) if p is not self._new]

    def gradient(self, loss_fn: Callable, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                 alphas_cumprod: torch.Tensor) -> dict:
        """``loss_fn(text_encoder, unet, ids, z0, t, noise, alphas_cumprod).backward()``: the loss, whether it
        kept the graph, the new row's gradient (None when none came) and how many frozen tensors got one."""
        for p in (self._new, *self._frozen):
            p.grad = None
        with torch.enable_grad():
            loss = loss_fn(self.text_encoder, self.unet, self.ids, z0, t, noise, alphas_cumprod)
            keeps_graph = isinstance(loss, torch.Tensor) and loss.requires_grad
            if keeps_graph:
                loss.sum().backward()
        return {"loss": loss, "keeps_graph": keeps_graph, "grad": self._new.grad,
                "frozen_with_grad": sum(p.grad is not None for p in self._frozen)}


def stand_in_velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``tests/test_dit.py``'s stand-in model at timestep 1000 sigma: a fixed nonlinear function of x and sigma
    (any shape (B, ...)), which the flow checks also feed to diffusers' FlowMatchEulerDiscreteScheduler."""
    w = torch.linspace(-1, 1, x[0].numel(), dtype=x.dtype).reshape(x.shape[1:])
    t = (1000 * sigma).to(x.dtype).reshape(-1, *([1] * (x.dim() - 1))) / 1000  # (B, 1, ...)
    return torch.tanh(x * w) * (1 + t) - 0.3 * x * t


class ProbeVelocity(torch.nn.Module):
    """A velocity function ``v(x, sigma)`` for the flow-matching exercises, strict about ``sigma`` (a tensor of shape
    (B,), one noise level in [0, 1] per sample, as ``course_lib.flow.VelocityFn`` says), with a log of its calls
    (batch size, smallest and largest sigma). ``kind``: "mlp", a ``flow.VelocityMLP(hidden=hidden)`` initialised from
    ``seed`` (points (B, 2)); "stand_in", `stand_in_velocity` (any shape); "ring", the exact marginal field of
    ``flow.GaussianMixture2D.ring()`` (points (B, 2))."""

    def __init__(self, kind: str = "stand_in", seed: int = 0, hidden: int = 32):
        super().__init__()
        from course_lib import flow

        if kind not in ("mlp", "stand_in", "ring"):
            raise ValueError(f"kind must be 'mlp', 'stand_in' or 'ring', got {kind!r}")
        self.kind = kind
        if kind == "mlp":
            with _seeded(seed):
                self.mlp = flow.VelocityMLP(hidden=hidden)
        self.mixture = flow.GaussianMixture2D.ring() if kind == "ring" else None
        self.calls: list[tuple[int, float, float]] = []

    def forward(self, x: torch.Tensor, sigma: Any) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise TypeError(f"velocity_fn(x, sigma) takes x as a tensor (B, ...), got {type(x).__name__}")
        b = x.shape[0]
        if not isinstance(sigma, torch.Tensor) or tuple(sigma.shape) != (b,):
            got = (f"a tensor of shape {tuple(sigma.shape)}" if isinstance(sigma, torch.Tensor)
                   else f"a {type(sigma).__name__}")
            raise ValueError(f"velocity_fn(x, sigma) takes sigma of shape (B,) = ({b},), one noise level per sample; "
                             f"got {got}")
        low, high = float(sigma.min()), float(sigma.max())
        self.calls.append((b, low, high))
        if not (0.0 <= low and high <= 1.0):
            raise ValueError(f"velocity_fn(x, sigma) takes noise levels sigma in [0, 1]; got values from {low:g} to "
                             f"{high:g}")
        if self.kind == "mlp":
            return self.mlp(x, sigma)
        if self.kind == "ring":
            return self.mixture.velocity(x, sigma)
        return stand_in_velocity(x, sigma)

    def gradient(self, loss_fn: Callable, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> dict:
        """``loss_fn(self, x0, noise, sigma).backward()``: the loss, whether it kept the graph, and the gradient of
        each of the network's parameters (None where none came)."""
        params = dict(self.named_parameters())
        for p in params.values():
            p.grad = None
        with torch.enable_grad():
            loss = loss_fn(self, x0, noise, sigma)
            keeps_graph = isinstance(loss, torch.Tensor) and loss.requires_grad
            if keeps_graph:
                loss.sum().backward()
        return {"loss": loss, "keeps_graph": keeps_graph, "grads": {k: p.grad for k, p in params.items()}}


PROBES: dict[str, Callable[..., Any]] = {
    "denoiser": ProbeDenoiser,
    "velocity": ProbeVelocity,
    "network": probe_network,
    "generator": probe_generator,
    "linear": probe_linear,
    "unet": probe_unet,
    "text_encoder": probe_text_encoder,
    "new_token": ProbeNewToken,
}


# ----------------------------------------------------------------------------------------------
# The agent core: serves one request against the learner's namespace (both ends use it)
# ----------------------------------------------------------------------------------------------
class AgentCore:
    """Executes requests from the checks on the learner's objects and answers with data only."""

    def __init__(self, namespace: Callable[[], dict]):
        self._namespace = namespace
        self._kept: dict[int, Any] = {}

    # -- resolving what the checks name --------------------------------------------------------
    def _keep(self, obj: Any) -> int:
        handle = len(self._kept) + 1
        self._kept[handle] = obj
        return handle

    def _resolve(self, tag: dict) -> Any:
        if "__probe__" in tag:
            return PROBES[tag["__probe__"]](**tag["kwargs"])
        if "__handle__" in tag:
            return self._kept[int(tag["__handle__"])]
        kind, key = tag["__ref__"]
        if kind == "name":
            ns = self._namespace()
            if key not in ns:
                raise _Missing(key)
            obj = ns[key]
        else:
            obj = self._kept[int(key)]
        for attr in tag["path"]:
            obj = getattr(obj, attr)
        return obj

    # -- serving ------------------------------------------------------------------------------
    def serve(self, request: dict) -> dict:
        """Answer one request. Never raises (except for the timeout alarm, handled by the caller)."""
        op = request.get("op")
        try:
            target = self._resolve(request["target"])
            if op == "describe":
                return {"ok": True, "value": _describe_object(target)}
            if op in ("get", "make"):  # make: target is a Probe, kept for later calls
                return {"ok": True, "value": to_wire(target, self._keep)}
            args = from_wire(request.get("args", []), self._resolve)
            kwargs = from_wire(request.get("kwargs", {}), self._resolve)
            before = _snapshot(args, kwargs)
            with _quiet() as log:
                start = time.perf_counter()
                if op == "call":
                    value = target(*args, **kwargs)
                elif op == "vjp":
                    value = _vjp(target, args, kwargs, request["wrt"], request["grad_output"])
                else:
                    raise ValueError(f"unknown op {op!r}")
                seconds = time.perf_counter() - start
            return {"ok": True, "value": to_wire(value, self._keep), "seconds": seconds,
                    "warnings": log.warnings, "mutated": _mutated(before, args, kwargs)}
        except _Missing as err:
            return {"ok": False, "error": {"type": "NameError", "message": f"{err.name} is not defined",
                                           "where": ""}}
        except (_CallTimeout, KeyboardInterrupt):
            return {"ok": False, "error": {"type": "Timeout", "message": "interrupted", "where": ""}}
        except BaseException as err:  # the learner's code may raise anything, SystemExit included
            return {"ok": False, "error": _error_info(err)}

    def release(self) -> None:
        self._kept.clear()


def _tensors_in(args: list, kwargs: dict) -> list[tuple[str, Any]]:
    """(label, tensor or array) for every tensor/array argument, also inside lists and tuples."""
    found = []
    for key, value in [(f"argument {i + 1}", a) for i, a in enumerate(args)] + [(k, v) for k, v in kwargs.items()]:
        items = [(key, value)] if not isinstance(value, (list, tuple)) else [
            (f"{key}[{j}]", v) for j, v in enumerate(value)]
        found += [(k, v) for k, v in items if isinstance(v, (torch.Tensor, np.ndarray))]
    return found


def _snapshot(args: list, kwargs: dict) -> list[tuple[str, Any, Any]]:
    return [(k, v, v.clone() if isinstance(v, torch.Tensor) else v.copy()) for k, v in _tensors_in(args, kwargs)]


def _mutated(before: list, args: list, kwargs: dict) -> list[str]:
    """Labels of the tensor arguments that the call changed in place."""
    changed = []
    for key, obj, copy in before:
        same = torch.equal(obj, copy) if isinstance(obj, torch.Tensor) else np.array_equal(obj, copy, equal_nan=True)
        if not same:
            changed.append(key)
    return changed


class _Missing(Exception):
    def __init__(self, name: str):
        self.name = name


def _vjp(fn: Callable, args: list, kwargs: dict, wrt: Sequence[int], grad_output: Any) -> dict:
    """Call fn with grad enabled on args[i] for i in wrt, backpropagate grad_output."""
    args = list(args)
    with torch.enable_grad():
        for i in wrt:
            args[i] = args[i].detach().clone().requires_grad_(True)
        out = fn(*args, **kwargs)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        grads_out = grad_output if isinstance(grad_output, (tuple, list)) else (grad_output,)
        pairs = [(o, g) for o, g in zip(outs, grads_out) if g is not None]
        if not all(isinstance(o, torch.Tensor) for o, _ in pairs):
            raise TypeError(f"expected tensor outputs, got {type(out).__name__}")
        if not any(o.requires_grad for o, _ in pairs):
            raise RuntimeError("the output does not depend on the inputs through autograd "
                               "(was it computed under torch.no_grad(), or with .detach()/.item()?)")
        loss = sum((o * g.to(o.dtype)).sum() for o, g in pairs if o.requires_grad)
        params = dict(fn.named_parameters()) if isinstance(fn, torch.nn.Module) else {}
        for p in params.values():
            p.grad = None
        loss.backward()
    return {
        "output": out,
        "arg_grads": [args[i].grad for i in wrt],
        "param_grads": {k: p.grad for k, p in params.items()},
    }


def _describe_object(obj: Any) -> dict:
    import inspect

    info = {
        "type": _type_name(obj),
        "is_class": isinstance(obj, type),
        "callable": callable(obj),
        "is_module": isinstance(obj, torch.nn.Module),
        "module_class": isinstance(obj, type) and issubclass(obj, torch.nn.Module),
        "signature": None,
    }
    with contextlib.suppress(TypeError, ValueError):
        info["signature"] = str(inspect.signature(obj))
    return info


def _error_info(err: BaseException) -> dict:
    """The error's type and message, and where in the learner's code it happened (one line)."""
    where = ""
    tb = err.__traceback__
    frames = traceback.extract_tb(tb) if tb is not None else []
    learner = [f for f in frames if not f.filename.endswith(("checking.py", "agent.py"))
               and "site-packages" not in f.filename and "/lib/python" not in f.filename]
    if learner:
        f = learner[-1]
        where = f"line {f.lineno} in {f.name}: {(f.line or '').strip()}"[:300]
    message = str(err)
    if isinstance(err, SystemExit):
        message = f"the code called sys.exit({err.code!r})"
    return {"type": type(err).__name__, "message": message[:600], "where": where}


class _Log:
    def __init__(self):
        self.warnings: list[str] = []


class _CappedSink(io.TextIOBase):
    def __init__(self):
        self.n = 0

    def write(self, s: str) -> int:
        self.n += len(s)
        return len(s)


@contextlib.contextmanager
def _quiet():
    """Swallow the learner's printing and record (never fail on) warnings while a check calls it."""
    log = _Log()
    sink = _CappedSink()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(sink), \
            contextlib.redirect_stderr(sink):
        warnings.simplefilter("always")
        try:
            yield log
        finally:
            log.warnings = [f"{w.category.__name__}: {w.message}"[:200] for w in caught[:5]]


# ----------------------------------------------------------------------------------------------
# Local agent: the learner's objects in this very process (notebook feedback)
# ----------------------------------------------------------------------------------------------
class LocalAgent:
    """Runs the checks against objects passed to `check` in a notebook."""

    def __init__(self, objects: dict[str, Any]):
        self.core = AgentCore(lambda: objects)

    def request(self, request: dict, timeout: float) -> dict:
        req = loads(dumps(to_wire(request)))  # the learner works on copies of the checker's data
        with _alarm(timeout):
            try:
                reply = self.core.serve(req)
            except _CallTimeout:
                reply = {"ok": False, "error": {"type": "Timeout", "message": "interrupted", "where": ""}}
        try:
            return loads(dumps(reply))
        except Exception as err:  # e.g. a tensor subclass that refuses to be saved
            return {"ok": False, "error": {"type": "TransferError", "message": str(err)[:300], "where": ""}}


@contextlib.contextmanager
def _alarm(seconds: float):
    """Raise _CallTimeout in this (main) thread after ``seconds``; a no-op off the main thread."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def on_alarm(signum, frame):
        raise _CallTimeout()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


