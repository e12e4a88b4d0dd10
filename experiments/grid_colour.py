"""The colour of a sample grid against CIFAR-10: channel means and the share of saturated red.

    python experiments/grid_colour.py assets/cifar_11min_seed*_nfe1.png --data-dir data

A grid is what apex_min.py writes at the end of a run (runs/NAME/samples_STEP_nfe1.png: 10 rows of
10 samples of 32x32, a class a row, 2 pixels of padding). For each grid and, with --data-dir
(the folder holding cifar-10-batches-py/), for the CIFAR-10 training set, this prints:
  mean rgb    the mean of each channel, in [0, 1]
  saturation  the mean saturation of the pixels, (max - min) / max of their channels (HSV's)
  red         the share of saturated red pixels (R > 0.6, G < 0.25 and B < 0.25)
  red images  the share of images more than a quarter of whose pixels are saturated red
Record: results/grid_colour.json (a row for each grid, and one for the training set).
"""
import json
import os
import sys

import numpy as np
import torch
from einops import rearrange

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import apex_min as am  # noqa: E402
import cifar_demo  # noqa: E402

SIZE, PAD, PER_ROW = 32, 2, 10   # apex_min.save_outputs: save_image(..., nrow=10), padding 2


def tiles(path: str) -> np.ndarray:
    """The images of a grid, (N, 32, 32, 3) in [0, 1]."""
    from PIL import Image
    grid = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255
    step = SIZE + PAD   # each image with the padding below and right of it
    rows, cols = (grid.shape[0] - PAD) // step, (grid.shape[1] - PAD) // step
    if cols != PER_ROW or rows * step + PAD != grid.shape[0] or cols * step + PAD != grid.shape[1]:
        raise ValueError(f"{grid.shape[1]}x{grid.shape[0]} pixels is not a grid of {PER_ROW} "
                         f"32x32 images a row")
    cells = rearrange(grid[PAD:, PAD:], "(r h) (c w) ch -> (r c) h w ch", h=step, w=step)
    return cells[:, :SIZE, :SIZE]


def colour(images: np.ndarray) -> dict:
    """The measures of the module docstring for images (N, H, W, 3) in [0, 1]."""
    r, g, b = images[..., 0], images[..., 1], images[..., 2]
    red = (r > 0.6) & (g < 0.25) & (b < 0.25)
    per_image = red.mean(axis=(1, 2))
    means = [round(float(images[..., c].mean(dtype=np.float64)), 4) for c in range(3)]
    x = torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1   # sample_stats' [-1, 1], channels first
    saturation = cifar_demo.sample_stats(x, torch.zeros(len(x)))["saturation"]
    return {"n": len(images), "mean_rgb": means, "saturation": saturation,
            "red": round(float(red.mean()), 4),
            "red_images": round(float((per_image > 0.25).mean()), 4)}


def main(argv=None):
    p = am.OneLineParser(prog="grid_colour.py", description=__doc__.split("\n")[0])
    p.add_argument("grids", nargs="+", help="sample grids written by apex_min.py")
    p.add_argument("--data-dir", help="folder with cifar-10-batches-py/: adds the training set")
    p.add_argument("--out", default=ROOT, help="the record goes to OUT/results/grid_colour.json")
    args = p.parse_args(argv)
    rows = []
    for path in args.grids:
        try:
            rows.append({"grid": os.path.basename(path), **colour(tiles(path))})
        except (OSError, ValueError) as e:
            p.error(f"{path}: {e}")
    if args.data_dir:
        x, _ = am.load_cifar(args.data_dir)
        x = x.permute(0, 2, 3, 1).numpy().astype(np.float32) / 255
        rows.append({"grid": "CIFAR-10 training set", **colour(x)})
    print(f"{'':32} {'n':>6}  {'mean r, g, b':<20} {'saturation':>10} {'red':>7} {'red images':>11}")
    for row in rows:
        rgb = ", ".join(f"{v:.3f}" for v in row["mean_rgb"])
        print(f"{row['grid']:32} {row['n']:>6}  {rgb:<20} {row['saturation']:>10.4f} {row['red']:>7.4f} "
              f"{row['red_images']:>11.4f}")
    os.makedirs(os.path.join(args.out, "results"), exist_ok=True)
    with open(os.path.join(args.out, "results", "grid_colour.json"), "w") as f:
        json.dump({"rows": rows, "env": am.environment()}, f, indent=1)


if __name__ == "__main__":
    main()
