"""Noise schedules of discrete-time diffusion models (docs/math.md, section 3), computed in float64.

    schedule = genkern.diffusion.schedules.NoiseSchedule("scaled_linear", beta_start=0.00085, beta_end=0.012)
    timesteps, prev_timesteps = schedule.timesteps(50, spacing="trailing")
    schedule.alphas_cumprod            # float64 CPU tensor of length T: alpha-bar_t, t = 0 .. T-1
    schedule.table(x.device)           # float32 [alpha-bar_prev(-1), alpha-bar_0, ..., alpha-bar_{T-1}]

The schedule is the one place the diffusion ops read alpha-bar from. The reference (genkern.diffusion.reference)
takes its coefficients from the float64 tensors; the kernels read `table(device)`, a float32 copy on the
tensors' device, made once per device and indexed with t + 1, so that t = -1 (the step after the last one)
needs no branch and per-sample timesteps need no host synchronisation.

Correspondence with diffusers' DDPMScheduler / DDIMScheduler configurations:

    beta_schedule "linear", "scaled_linear"      same names;  "squaredcos_cap_v2"  ->  "cosine"
    trained_betas                                ->  betas
    rescale_betas_zero_snr                       ->  rescale_zero_terminal_snr
    set_alpha_to_one (DDIM)                      ->  final_alpha_one (DDPMScheduler always uses 1)
    timestep_spacing, steps_offset               ->  the arguments of `timesteps`

diffusers builds its betas in float32 (the cosine ones in Python floats, then rounds them to float32) and
takes the cumulative product in float32, so its alpha-bar agrees with ours to float32 precision only.
"""

from __future__ import annotations

import math
import numbers
import threading

import numpy as np
import torch

from .. import _checks

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
SPACINGS = ("leading", "trailing", "linspace")
COSINE_S = 0.008
COSINE_MAX_BETA = 0.999


def _real(name: str, x) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    return x


def _flag(name: str, x) -> bool:
    if not isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(x).__name__}")
    return bool(x)


def linear_betas(num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """beta = linspace(beta_start, beta_end, T)."""
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)


def scaled_linear_betas(num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """beta = linspace(sqrt(beta_start), sqrt(beta_end), T)^2 (latent diffusion's schedule)."""
    return torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_train_timesteps, dtype=torch.float64) ** 2


def cosine_betas(num_train_timesteps: int, s: float = COSINE_S, max_beta: float = COSINE_MAX_BETA) -> torch.Tensor:
    """Nichol & Dhariwal (2021): f(t) = cos^2(((t/T + s)/(1 + s)) pi/2), beta_i = min(1 - f(i+1)/f(i), 0.999).

    Evaluated in Python floats, term by term as written, so that rounding it to float32 reproduces
    diffusers' "squaredcos_cap_v2" betas.
    """
    T = num_train_timesteps

    def f(t: float) -> float:
        return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2

    return torch.tensor([min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)], dtype=torch.float64)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. (2023), Algorithm 1: shift and scale sqrt(alpha-bar) so that its last value is 0 and its first
    is unchanged, then recover the betas (the last one becomes 1)."""
    a = torch.cumprod(1.0 - betas, dim=0).sqrt()
    a0, aT = a[0].clone(), a[-1].clone()
    a = (a - aT) * a0 / (a0 - aT)
    alphas_cumprod = a * a
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1.0 - alphas


class NoiseSchedule:
    """A discrete noise schedule beta_0 .. beta_{T-1} and its alpha-bar, in float64.

    Args:
        beta_schedule: "linear", "scaled_linear" or "cosine" (Nichol & Dhariwal's, diffusers'
            "squaredcos_cap_v2"; it ignores beta_start and beta_end). Ignored when `betas` is given.
        num_train_timesteps: T. Defaults to 1000 for a named schedule and to len(betas) when `betas` is
            given (giving both, they must agree).
        beta_start, beta_end: the first and last beta of the linear schedules, 0 < beta_start <= beta_end < 1.
        betas: explicit betas (a 1-D sequence or tensor of values in (0, 1]); overrides `beta_schedule`.
        rescale_zero_terminal_snr: rescale to zero terminal SNR (Lin et al. 2023, Alg. 1); alpha-bar_{T-1}
            becomes 0, which only v-prediction (or sample prediction) models can use.
        final_alpha_one: alpha-bar at prev_t = -1 (the "previous" timestep of the last step) is 1 when True,
            alpha-bar_0 when False (diffusers' DDIM `set_alpha_to_one`).
    """

    def __init__(
        self,
        beta_schedule: str = "linear",
        num_train_timesteps: int | None = None,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        betas=None,
        rescale_zero_terminal_snr: bool = False,
        final_alpha_one: bool = True,
    ):
        if num_train_timesteps is not None:
            num_train_timesteps = _checks.integer("num_train_timesteps", num_train_timesteps, low=1)
        rescale = _flag("rescale_zero_terminal_snr", rescale_zero_terminal_snr)
        self._final_alpha_one = _flag("final_alpha_one", final_alpha_one)

        if betas is not None:
            betas = self._explicit_betas(betas)
            if num_train_timesteps is not None and num_train_timesteps != betas.numel():
                raise ValueError(
                    f"num_train_timesteps={num_train_timesteps} but betas has {betas.numel()} "
                    "values (leave num_train_timesteps out to use len(betas))"
                )
            self._schedule = "custom"
        else:
            if not isinstance(beta_schedule, str):
                raise TypeError(f"beta_schedule must be a str, got {type(beta_schedule).__name__}")
            if beta_schedule not in BETA_SCHEDULES:
                hint = " (diffusers' 'squaredcos_cap_v2' is 'cosine')" if beta_schedule == "squaredcos_cap_v2" else ""
                raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}{hint}")
            T = 1000 if num_train_timesteps is None else num_train_timesteps
            start, end = _real("beta_start", beta_start), _real("beta_end", beta_end)
            if beta_schedule != "cosine":
                if not 0.0 < start < 1.0:
                    raise ValueError(f"beta_start must be in (0, 1), got {start}")
                if not 0.0 < end < 1.0:
                    raise ValueError(f"beta_end must be in (0, 1), got {end}")
                if start > end:
                    raise ValueError(f"beta_start ({start}) must not exceed beta_end ({end})")
            if beta_schedule == "linear":
                betas = linear_betas(T, start, end)
            elif beta_schedule == "scaled_linear":
                betas = scaled_linear_betas(T, start, end)
            else:
                betas = cosine_betas(T)
            self._schedule = beta_schedule
            self._beta_start, self._beta_end = start, end

        if rescale:
            if betas.numel() < 2:
                raise ValueError("rescale_zero_terminal_snr needs num_train_timesteps >= 2")
            betas = globals()["rescale_zero_terminal_snr"](betas)
        self._rescaled = rescale

        self._betas = betas
        self._alphas = 1.0 - betas
        self._alphas_cumprod = torch.cumprod(self._alphas, dim=0)
        final = 1.0 if self._final_alpha_one else float(self._alphas_cumprod[0])
        # [alpha-bar_prev(-1), alpha-bar_0, ..., alpha-bar_{T-1}]: index with t + 1.
        self._extended = torch.cat([torch.tensor([final], dtype=torch.float64), self._alphas_cumprod])
        self._tables: dict[torch.device, torch.Tensor] = {}
        self._extended_by_device: dict[torch.device, torch.Tensor] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _explicit_betas(betas) -> torch.Tensor:
        if isinstance(betas, torch.Tensor):
            if not (betas.dtype.is_floating_point or betas.dtype in (torch.int64, torch.int32)):
                raise TypeError(f"betas must hold real numbers, got dtype {betas.dtype}")
            b = betas.detach().to(device="cpu", dtype=torch.float64).clone()
        else:
            try:
                b = torch.as_tensor(np.asarray(betas, dtype=np.float64), dtype=torch.float64).clone()
            except (TypeError, ValueError) as e:
                raise TypeError(f"betas must be a 1-D sequence of real numbers: {e}") from None
        if b.dim() != 1 or b.numel() == 0:
            raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {tuple(b.shape)}")
        if not bool(torch.isfinite(b).all()) or not bool(((b > 0) & (b <= 1)).all()):
            raise ValueError("betas must all be in (0, 1]")
        return b

    # ------------------------------------------------------------------------------------------ properties

    @property
    def num_train_timesteps(self) -> int:
        """T: timesteps run from 0 to T - 1."""
        return self._betas.numel()

    @property
    def betas(self) -> torch.Tensor:
        """beta_t, float64 CPU tensor of length T (a copy)."""
        return self._betas.clone()

    @property
    def alphas(self) -> torch.Tensor:
        """alpha_t = 1 - beta_t, float64 CPU tensor of length T (a copy)."""
        return self._alphas.clone()

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """alpha-bar_t = prod_{s <= t} alpha_s, float64 CPU tensor of length T (a copy)."""
        return self._alphas_cumprod.clone()

    @property
    def final_alpha_cumprod(self) -> float:
        """alpha-bar at prev_t = -1: 1.0 when final_alpha_one, else alpha-bar_0."""
        return float(self._extended[0])

    @property
    def final_alpha_one(self) -> bool:
        return self._final_alpha_one

    @property
    def rescaled_zero_terminal_snr(self) -> bool:
        return self._rescaled

    # ------------------------------------------------------------------------------------------ lookups

    # Columns of `table`: what the kernels need of alpha-bar, each computed in float64 before rounding, so
    # that 1 - alpha-bar near t = 0 (about 1e-4) keeps its float32 precision instead of losing 3 digits.
    TABLE_COLUMNS = ("alpha_bar", "one_minus_alpha_bar", "sqrt_alpha_bar", "sqrt_one_minus_alpha_bar")

    def table(self, device=None) -> torch.Tensor:
        """float32 (T + 1, 4) on `device`: row t + 1 describes alpha-bar_t, row 0 the final alpha (1, or
        alpha-bar_0 when final_alpha_one is False), so a kernel reads any t in [-1, T) at row t + 1 without a
        host synchronisation. Columns: TABLE_COLUMNS. Made once per device and cached: treat it as read-only.
        """
        device = _normalize_device(device)
        table = self._tables.get(device)
        if table is None:
            with self._lock:
                table = self._tables.get(device)
                if table is None:
                    ab = self._extended
                    columns = (ab, 1.0 - ab, ab.sqrt(), (1.0 - ab).sqrt())
                    table = torch.stack(columns, dim=1).to(torch.float32).to(device)
                    self._tables[device] = table
        return table

    def alpha_cumprod(self, t) -> torch.Tensor:
        """alpha-bar_t in float64 for an int or an integer tensor t with values in [-1, T) (-1: the final alpha).

        An int gives a 0-dim CPU tensor; a tensor gives a tensor of its shape on its device.
        """
        T = self.num_train_timesteps
        if isinstance(t, torch.Tensor):
            if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
                raise TypeError(f"t must be an integer tensor, got dtype {t.dtype}")
            if t.numel() and (int(t.min()) < -1 or int(t.max()) >= T):
                raise ValueError(f"t must be in [-1, {T}), got values in [{int(t.min())}, {int(t.max())}]")
            return self._extended_on(t.device)[t.long() + 1]
        t = _checks.integer("t", t, low=-1, high=T - 1)
        return self._extended[t + 1].clone()

    def _extended_on(self, device) -> torch.Tensor:
        """The float64 [final, alpha-bar_0, ...] on `device` (for the reference implementations)."""
        device = _normalize_device(device)
        if device.type == "cpu":
            return self._extended
        ext = self._extended_by_device.get(device)
        if ext is None:
            ext = self._extended.to(device)
            self._extended_by_device[device] = ext
        return ext

    # ------------------------------------------------------------------------------------------ inference steps

    def timesteps(
        self, num_steps: int, spacing: str = "leading", steps_offset: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The N = num_steps inference timesteps, descending, and the previous timestep of each step.

        Returns (timesteps, prev_timesteps), int64 CPU tensors of length N; prev_timesteps[i] is
        timesteps[i + 1] and the last one is -1. Spacings (Lin et al. 2023, Table 2), T = num_train_timesteps:

            leading:  arange(N) * (T // N), reversed, + steps_offset
            trailing: round(arange(T, 0, -T/N)) - 1                      (its first N values)
            linspace: round(linspace(0, T - 1, N)), reversed

        evaluated with numpy in float64 and rounded half to even, as diffusers does. `steps_offset` applies
        to "leading" only (diffusers ignores it for the other spacings too), and must keep the first
        timestep below T.

        diffusers' trailing spacing is np.arange(T, 0, -T/N) without the "first N values": for some N
        (T = 1000: N = 61, 103, 121, ...) float rounding gives it N + 1 entries, the last one -1.
        """
        T = self.num_train_timesteps
        N = _checks.integer("num_steps", num_steps, low=1, high=T)
        if not isinstance(spacing, str):
            raise TypeError(f"spacing must be a str, got {type(spacing).__name__}")
        if spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
        steps_offset = _checks.integer("steps_offset", steps_offset, low=0)
        if spacing == "leading":
            ts = np.arange(N, dtype=np.int64)[::-1] * (T // N)
            if ts[0] + steps_offset >= T:
                raise ValueError(
                    f"steps_offset={steps_offset} puts the first timestep at {ts[0] + steps_offset}, "
                    f"past the last training timestep {T - 1} (num_steps={N}, leading spacing)"
                )
            ts = ts + steps_offset
        elif spacing == "trailing":
            ts = np.round(np.arange(T, 0, -T / N))[:N].astype(np.int64) - 1
        else:
            ts = np.linspace(0, T - 1, N).round()[::-1].astype(np.int64)
        timesteps = torch.from_numpy(np.ascontiguousarray(ts))
        prev = torch.cat([timesteps[1:], torch.tensor([-1], dtype=torch.int64)])
        return timesteps, prev

    def __repr__(self) -> str:
        T = self.num_train_timesteps
        if self._schedule == "custom":
            what = "betas=<custom>"
        elif self._schedule == "cosine":
            what = "'cosine'"
        else:
            what = f"{self._schedule!r}, beta_start={self._beta_start!r}, beta_end={self._beta_end!r}"
        flags = ""
        if self._rescaled:
            flags += ", rescale_zero_terminal_snr=True"
        if not self._final_alpha_one:
            flags += ", final_alpha_one=False"
        ab = self._alphas_cumprod
        return (
            f"NoiseSchedule({what}, num_train_timesteps={T}{flags}; "
            f"alpha-bar {float(ab[0]):.6g} -> {float(ab[-1]):.6g})"
        )


def _normalize_device(device) -> torch.device:
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device
