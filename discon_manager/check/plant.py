"""A rigid-rotor NREL 5-MW plant for closing the loop around a real controller.

``discon-check`` needs a turbine that reacts to the controller's commands, so
that a controller which state-shifts, answers one step late or returns stale
values shows it in the trajectory, not only in a log line. A full aero-elastic
model would be overkill: one rotational degree of freedom (rotor and generator
on a stiff shaft), a smooth Cp(lambda, pitch) surface and a wind history that
takes the NREL 5-MW baseline through torque regions 1.5, 2, 2.5 and 3 are
enough.

Reproducibility matters more than fidelity here: the in-process and network
runs are compared byte for byte, so everything is plain ``float`` arithmetic
in a fixed order, the wind is a function of time only and there is no
randomness anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

#: Torque-region boundaries of the NREL 5-MW baseline (generator speed, rad/s),
#: as published in NREL/TP-500-38060 chapter 7 (see shared/NREL5MW.md).
CUT_IN_GEN_SPEED = 70.16224
REGION_2_GEN_SPEED = 91.21091
REGION_2_GAIN = 2.332287
RATED_GEN_SPEED = 121.6805
RATED_POWER = 5296610.0
SLIP_PERCENT = 10.0
REGION_3_MIN_PITCH = 0.01745329

#: Region names in the order the turbine passes them as the wind rises.
REGIONS: tuple[str, ...] = ("1", "1.5", "2", "2.5", "3")


def _region_25_start() -> float:
    """Generator speed where the region-2 curve meets the region-2.5 line.

    Computed exactly as the baseline controller does, so the classification
    agrees with the branch the controller takes.
    """
    sync = RATED_GEN_SPEED / (1.0 + 0.01 * SLIP_PERCENT)
    slope = (RATED_POWER / RATED_GEN_SPEED) / (RATED_GEN_SPEED - sync)
    disc = slope * (slope - 4.0 * REGION_2_GAIN * sync)
    return (slope - math.sqrt(disc)) / (2.0 * REGION_2_GAIN)


#: About 119.0 rad/s.
REGION_25_GEN_SPEED = _region_25_start()


def classify_region(gen_speed: float, pitch: float) -> str:
    """The baseline controller's torque region for a generator speed and pitch.

    Region 3 is entered at rated speed or whenever the pitch is at least
    1 degree, like the controller's own test (which uses its filtered speed and
    its last pitch command; the measured speed and the current command are
    close enough to tell which regions a run visited).
    """
    if gen_speed >= RATED_GEN_SPEED or pitch >= REGION_3_MIN_PITCH:
        return "3"
    if gen_speed <= CUT_IN_GEN_SPEED:
        return "1"
    if gen_speed < REGION_2_GEN_SPEED:
        return "1.5"
    if gen_speed < REGION_25_GEN_SPEED:
        return "2"
    return "2.5"


def power_coefficient(tsr: float, pitch_deg: float) -> float:
    """Heier/Slootweg Cp(lambda, beta): smooth, peaks near 0.48 at lambda = 8.1.

    ``pitch_deg`` is clipped at 0 (the formula is not meant for negative
    pitch), ``tsr`` at 0.01 (the rotor may stand still), the result at 0 (a
    rotor far beyond its design tip-speed ratio would otherwise drive the
    generator backwards).
    """
    b = pitch_deg if pitch_deg > 0.0 else 0.0
    lam = tsr if tsr > 0.01 else 0.01
    inv_li = 1.0 / (lam + 0.08 * b) - 0.035 / (b * b * b + 1.0)
    cp = 0.5176 * (116.0 * inv_li - 0.4 * b - 5.0) * math.exp(-21.0 * inv_li) + 0.0068 * lam
    return cp if cp > 0.0 else 0.0


def wind_speed(t: float, low: float = 5.5, high: float = 18.0, period: float = 600.0) -> float:
    """Hub wind speed (m/s) at time ``t``: a raised cosine from ``low`` to ``high`` and back.

    A function of time only, so a run can be repeated bit for bit. The slow
    ramp (at most 0.07 m/s per second) keeps the rotor near equilibrium, so
    the controller visits every torque region in turn: 1.5 at the start and
    the end, 2 and 2.5 on the way, 3 around the 18 m/s peak at ``period / 2``.
    """
    return low + (high - low) * 0.5 * (1.0 - math.cos(2.0 * math.pi * t / period))


@dataclass(frozen=True, slots=True)
class PlantParams:
    """NREL 5-MW numbers (shared/NREL5MW.md); defaults are the published ones."""

    rotor_radius: float = 63.0
    gearbox_ratio: float = 97.0
    rotor_inertia: float = 38759236.0  # kg m^2 about the low-speed shaft
    generator_inertia: float = 534.116  # kg m^2 on the high-speed shaft
    air_density: float = 1.225
    generator_efficiency: float = 0.944  # electrical power only
    #: First-order pitch-actuator time constant (s); 0 means the blades follow
    #: the command exactly, the way ServoDyn applies a DLL's pitch command.
    pitch_time_constant: float = 0.0
    min_pitch: float = 0.0
    max_pitch: float = 1.570796
    max_pitch_rate: float = 0.1396263

    @property
    def drivetrain_inertia(self) -> float:
        """Total inertia referred to the low-speed shaft: J_rotor + N^2 J_gen."""
        n = self.gearbox_ratio
        return self.rotor_inertia + n * n * self.generator_inertia

    @property
    def swept_area(self) -> float:
        return math.pi * self.rotor_radius * self.rotor_radius


class Plant:
    """One rotational degree of freedom: J dw/dt = T_aero - N T_gen.

    The state at time ``t`` is what the controller is told (:attr:`rotor_speed`,
    :attr:`pitch`); :meth:`step` applies the controller's commands for one
    fixed step of explicit Euler integration. Non-finite commands are
    ignored (the previous value is kept, and :attr:`nonfinite_commands`
    counts them) and the speed never goes below zero, so a misbehaving
    controller gives a bounded, reportable trajectory instead of NaNs.
    """

    def __init__(
        self,
        params: PlantParams | None = None,
        wind: Callable[[float], float] = wind_speed,
        rotor_speed: float = 0.806,
        pitch: float = 0.0,
    ) -> None:
        # 0.806 rad/s (7.7 rpm, 78.2 rad/s at the generator) is close to the
        # region-1.5 equilibrium at the start wind of 5.5 m/s: no start-up transient.
        self.params = params or PlantParams()
        self.wind = wind
        self.time = 0.0
        self.rotor_speed = rotor_speed
        self.pitch = pitch
        self.gen_torque = 0.0
        self.azimuth = 0.0
        self.aero_torque = 0.0
        self.nonfinite_commands = 0
        self._inertia = self.params.drivetrain_inertia
        self._half_rho_a = 0.5 * self.params.air_density * self.params.swept_area

    @property
    def generator_speed(self) -> float:
        return self.rotor_speed * self.params.gearbox_ratio

    @property
    def electrical_power(self) -> float:
        p = self.params
        return self.gen_torque * self.rotor_speed * p.gearbox_ratio * p.generator_efficiency

    def aerodynamic_torque(self, wind: float, rotor_speed: float, pitch: float) -> float:
        """Rotor torque (N m, low-speed shaft) from the Cp surface.

        Written with Cp/lambda (torque coefficient) so a standing rotor has a
        finite starting torque instead of a division by zero.
        """
        if wind <= 0.0:
            return 0.0
        r = self.params.rotor_radius
        tsr = rotor_speed * r / wind
        lam = tsr if tsr > 0.01 else 0.01
        cp = power_coefficient(lam, math.degrees(pitch))
        return self._half_rho_a * r * wind * wind * cp / lam

    def step(self, t: float, dt: float, pitch_command: float, torque_demand: float) -> None:
        """Advance from time ``t`` to ``t + dt`` under the controller's commands.

        ``t`` is passed in (the driver computes it as ``k * dt``) rather than
        accumulated, so a long run does not drift from the times the
        controller is told. Order (fixed, for bit reproducibility): pitch
        actuator, generator torque, aerodynamic torque at the new pitch and
        the current speed and wind at ``t``, Euler update of speed and azimuth.
        """
        p = self.params
        if math.isfinite(pitch_command):
            cmd = min(max(pitch_command, p.min_pitch), p.max_pitch)
            if p.pitch_time_constant > 0.0:
                gain = dt / p.pitch_time_constant
                self.pitch += (gain if gain < 1.0 else 1.0) * (cmd - self.pitch)
            else:
                self.pitch = cmd
        else:
            self.nonfinite_commands += 1
        if math.isfinite(torque_demand):
            self.gen_torque = torque_demand
        else:
            self.nonfinite_commands += 1
        wind = self.wind(t)
        aero = self.aerodynamic_torque(wind, self.rotor_speed, self.pitch)
        self.aero_torque = aero
        accel = (aero - p.gearbox_ratio * self.gen_torque) / self._inertia
        speed = self.rotor_speed + dt * accel
        if not speed > 0.0:  # also catches NaN
            speed = 0.0
        self.rotor_speed = speed
        self.azimuth = math.fmod(self.azimuth + dt * speed, 2.0 * math.pi)
        self.time = t + dt
