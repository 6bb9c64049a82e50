"""A design as an LS-DYNA d3plot series (d3plot, d3plot01, ...), read by lasso-python.

The values at nodes: displacement (each state's node position minus the first state's), velocity, acceleration and
temperature where the file has them, and from the element results von_mises (the von Mises stress of each solid,
shell and thick shell, the mean over its integration points and layers) and plastic_strain (effective plastic strain,
likewise), averaged onto the nodes of the elements. A femzip-compressed d3plot cannot be read without SIDACT's
proprietary library: it is refused with that said.
"""
from pathlib import Path

import numpy as np

from modules.errors import InputError
from modules.solver_files.results import REEXPORT_FIX, DesignResults, Pick, Variable, cell_average, reading

NODE_ARRAYS = {"velocity": "node_velocity", "acceleration": "node_acceleration", "temperature": "node_temperature"}
# element kinds with a stress tensor and effective plastic strain per integration point: (lasso prefix, cell type)
STRESSED = (("element_solid", "hexahedron"), ("element_shell", "quad"), ("element_tshell", "hexahedron"))


class D3plotSeries(DesignResults):
    format = "LS-DYNA d3plot"

    def __init__(self, name: str, path: Path):
        super().__init__(name, path)
        from lasso.dyna.d3plot_header import D3plotHeader

        with reading(path, "an LS-DYNA d3plot"):
            femzip = D3plotHeader(str(path)).has_femzip_indicator
        if femzip:
            raise InputError(path, f"design {self.name} is femzip-compressed, which only SIDACT's proprietary library "
                             "reads", "uncompress it with femzip's own tool (or have LS-DYNA write plain d3plot "
                             "files), then import the plain d3plot series")
        self._geometry = None

    def _load(self, state_arrays: list) -> dict:
        """The geometry, the time of every state and the state arrays named (only those: a crash model's stresses of
        every state would not fit in memory beside the next design's)."""
        from lasso.dyna import D3plot

        with reading(self.path, "an LS-DYNA d3plot series"):
            plot = D3plot(str(self.path), use_femzip=False, state_array_filter=["timesteps", *state_arrays])
        arrays = dict(plot.arrays)
        missing = [key for key in ("node_coordinates", "timesteps") if key not in arrays]
        if missing:
            raise InputError(self.path, f"cannot be read as an LS-DYNA d3plot series (design {self.name} has no "
                             f"{', '.join(missing)})", REEXPORT_FIX)
        return {"header": plot.header, **arrays}

    def geometry(self) -> dict:
        if self._geometry is None:
            self._geometry = self._load([])
        return self._geometry

    def points(self) -> np.ndarray:
        return np.asarray(self.geometry()["node_coordinates"], dtype=np.float64)

    def cells(self) -> list:
        arrays, kept = self.geometry(), []
        for prefix, kind in STRESSED:
            nodes = arrays.get(f"{prefix}_node_indexes")
            if nodes is not None and len(nodes):
                kept.append((kind, np.asarray(nodes, dtype=np.int64)[:, :8 if kind == "hexahedron" else 4]))
        beams = arrays.get("element_beam_node_indexes")
        if beams is not None and len(beams):
            kept.append(("line", np.asarray(beams, dtype=np.int64)[:, :2]))  # the third node orients the section
        return kept

    def times(self) -> np.ndarray:
        return np.asarray(self.geometry()["timesteps"], dtype=np.float64)

    def variables(self) -> dict:
        """What the header says the states hold (a value it promises but a state lacks is refused when read)."""
        header = self.geometry()["header"]
        found = {"displacement": Variable(3)} if header.has_node_displacement else {}
        for name, flag in (("velocity", "has_node_velocity"), ("acceleration", "has_node_acceleration")):
            if getattr(header, flag):
                found[name] = Variable(3)
        if header.has_node_temperatures:
            found["temperature"] = Variable(3 if header.has_node_temperature_layers else 1)
        solids = header.n_solids > 0
        shells = header.n_shells + header.n_thick_shells > 0
        if (solids and header.has_solid_stress) or (shells and header.has_shell_tshell_stress):
            found["von_mises"] = Variable(1, on_cells=True)
        if solids or (shells and header.has_shell_tshell_pstrain):
            found["plastic_strain"] = Variable(1, on_cells=True)
        return found

    def read(self, picks: list) -> np.ndarray:
        wanted = {"node_displacement"}
        for pick in picks:
            wanted.update([NODE_ARRAYS[pick.name]] if pick.name in NODE_ARRAYS else
                          [f"{prefix}_stress" for prefix, _ in STRESSED] if pick.name == "von_mises" else
                          [f"{prefix}_effective_plastic_strain" for prefix, _ in STRESSED]
                          if pick.name == "plastic_strain" else [])
        arrays = self._load(sorted(wanted))
        if "node_displacement" not in arrays:
            raise InputError(self.path, f"design {self.name} has no node positions per state", REEXPORT_FIX)
        positions = np.asarray(arrays["node_displacement"], dtype=np.float64)  # [T, M, 3]: where each node is
        n_steps, n_nodes = positions.shape[:2]
        values = np.empty((n_steps, len(picks) * n_nodes), dtype=np.float32)
        for slot, pick in enumerate(picks):
            if pick.name == "displacement":
                per_step = [pick.values(step - positions[0]) for step in positions]
            elif pick.name in NODE_ARRAYS and NODE_ARRAYS[pick.name] in arrays:
                per_step = [pick.values(step) for step in np.asarray(arrays[NODE_ARRAYS[pick.name]])]
            elif pick.name in ("von_mises", "plastic_strain"):
                per_step = self._element_values(pick, arrays, n_nodes)
            else:
                raise self.missing(pick)
            values[:, slot * n_nodes:(slot + 1) * n_nodes] = np.asarray(per_step).reshape(n_steps, n_nodes)
        self._geometry = None  # read: the next design's states are not held beside these
        return values

    def _element_values(self, pick: Pick, arrays: dict, n_nodes: int) -> np.ndarray:
        """von_mises or plastic_strain per element (mean over its integration points and layers) [T, E], averaged
        onto the nodes of the elements that have it -> [T, M]."""
        name, blocks, per_element = pick.name, [], []
        for prefix, kind in STRESSED:
            key = f"{prefix}_stress" if name == "von_mises" else f"{prefix}_effective_plastic_strain"
            if key not in arrays or not len(arrays[f"{prefix}_node_indexes"]):
                continue
            values = np.asarray(arrays[key], dtype=np.float64)
            if name == "von_mises":
                values = von_mises(values)  # [T, E, points]
            per_element.append(values.reshape(values.shape[0], values.shape[1], -1).mean(axis=2))
            blocks.append(np.asarray(arrays[f"{prefix}_node_indexes"])[:, :8 if kind == "hexahedron" else 4])
        if not blocks:
            raise self.missing(pick)
        average = cell_average(blocks, n_nodes)
        return average(np.concatenate(per_element, axis=1))


def von_mises(stress: np.ndarray) -> np.ndarray:
    """[..., 6] stress (xx, yy, zz, xy, yz, zx, as LS-DYNA stores it) -> the von Mises stress [...]."""
    xx, yy, zz, xy, yz, zx = np.moveaxis(stress, -1, 0)
    return np.sqrt(0.5 * ((xx - yy) ** 2 + (yy - zz) ** 2 + (zz - xx) ** 2) + 3.0 * (xy ** 2 + yz ** 2 + zx ** 2))
