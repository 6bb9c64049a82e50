"""Write the shipped demo case's simulations as a solver would have left them, to try --import on: one folder per
design holding a ParaView collection (.pvd) and one .vtu file per time step (meshio's writer, on input_data/plate.vtu),
the temperature as point values at times t_k = k * 0.4 / 24 (make_demo_case.py's snapshots), and runs.csv naming each
design's folder beside its parameters.

    python input_data/export_demo_results.py demo_results
    mkdir imported && cd imported
    python ../SimulGen-VAE.py --import=../demo_results --fields=temperature --order_by=../demo_results/runs.csv:run
"""
import argparse
from pathlib import Path

import meshio
import numpy as np

HERE = Path(__file__).resolve().parent
T_END = 0.4  # make_demo_case.py's --t-end


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="the results folder to write (must not exist)")
    parser.add_argument("--designs", type=int, default=None, help="only the first K designs (default: all 96)")
    args = parser.parse_args(argv)
    fields = np.load(HERE / "dataset1.npy", mmap_mode="r")[:args.designs]
    plate = meshio.read(HERE / "plate.vtu")
    lines = (HERE / "parameters.csv").read_text().splitlines()
    steps = fields.shape[1]
    args.out.mkdir(parents=True)
    rows = ["run," + lines[0]]
    for design, values in enumerate(fields, start=1):
        name = f"run_{design:03d}"
        folder = args.out / name
        folder.mkdir()
        listed = []
        for step in range(steps):
            time = (step + 1) * T_END / steps
            file = f"{name}_{step:02d}.vtu"
            meshio.write(folder / file, meshio.Mesh(plate.points, plate.cells,
                                                    point_data={"temperature": np.asarray(values[step])}))
            listed.append(f'    <DataSet timestep="{time!r}" part="0" file="{file}"/>')
        (folder / f"{name}.pvd").write_text('<?xml version="1.0"?>\n<VTKFile type="Collection" version="0.1">\n'
                                            "  <Collection>\n" + "\n".join(listed) + "\n  </Collection>\n</VTKFile>\n")
        rows.append(f"{name},{lines[design]}")
    (args.out / "runs.csv").write_text("\n".join(rows) + "\n")
    print(f"Wrote {len(fields)} designs x {steps} steps to {args.out}/ (.pvd + .vtu each) and {args.out}/runs.csv")


if __name__ == "__main__":
    main()
