"""Embedded view pairs: one procedural scene seen from two cameras, with ground-truth depth and correspondence.

A scene is a stack of textured planes parallel to the first camera's image plane: a background wall and two or
three shapes (discs, rotated squares, triangles) floating at different depths in front of it. The second camera
is moved sideways and forwards and slightly rotated, so each plane is seen through its own homography and the
shapes shift against the wall by their parallax; nearer shapes hide farther ones in each view. Textures are sums
of random sinusoids in the plane's own coordinates, evaluated exactly at every ray (2x2 samples per pixel), so the
two views agree where they see the same point. What cross-view completion pre-trains on (CroCo), and a dense task
with exact labels: view 1's depth and where each of its pixels lands in view 2.
"""

from __future__ import annotations

import numpy as np

_SUPERSAMPLE = 2  # samples per pixel side for the colours (depth and flow are taken at the pixel centre)
_WALL_DEPTH = (6.0, 8.0)
_SHAPE_DEPTH = (2.0, 4.5)
SHAPE_KINDS = ("disc", "square", "triangle")


def build_view_pairs(seed: int = 0, resolution: int = 32, num_train: int = 1024, num_test: int = 128):
    """A `DatasetDict` with columns "image" (view 1, RGB PIL), "reference" (view 2, RGB PIL), "depth" (view 1's
    depth along the optical axis, float32 (resolution, resolution)) and "flow" (float32 (2, resolution,
    resolution): the (dx, dy) in pixels from each pixel of view 1 to the projection of its 3D point in view 2,
    occluded or not).

    Sample i of a split comes from its own generator seeded with (seed, split, i), so the set is the same
    whatever its size.
    """
    import datasets

    from ..engine.loop import progress_bar

    if resolution < 8:
        raise ValueError(f"resolution must be at least 8 pixels, got {resolution}")
    features = datasets.Features({
        "image": datasets.Image(), "reference": datasets.Image(),
        "depth": datasets.Array2D((resolution, resolution), "float32"),
        "flow": datasets.Array3D((2, resolution, resolution), "float32")})
    splits = {}
    for split_id, (split, size) in enumerate((("train", num_train), ("test", num_test))):
        rows = {"image": [], "reference": [], "depth": [], "flow": []}
        for i in progress_bar(range(size), desc=f"building view_pairs ({split})"):
            sample = render_pair(resolution, np.random.default_rng([seed, split_id, i]))
            for name in rows:
                rows[name].append(sample[name])
        splits[split] = datasets.Dataset.from_dict(rows, features=features)
    return datasets.DatasetDict(splits)


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    cy, sy, cp, sp, cr, sr = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll)
    r_yaw = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    r_pitch = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    r_roll = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return r_roll @ r_pitch @ r_yaw


def _random_scene(rng: np.random.Generator) -> list[dict]:
    """Planes, nearest last: each with its depth, texture (sinusoids) and shape (None for the wall)."""

    def texture():
        return {"base": rng.uniform(0.15, 0.85, 3), "freq": rng.normal(0, 2.5, (4, 2)),
                "phase": rng.uniform(0, 2 * np.pi, (4, 3)), "amp": rng.uniform(0.05, 0.2, (4, 3))}

    planes = [{"z": rng.uniform(*_WALL_DEPTH), "texture": texture(), "shape": None}]
    for z in np.sort(rng.uniform(*_SHAPE_DEPTH, rng.integers(2, 4)))[::-1]:
        # a shape of half-size about a quarter of the first view's field of view at its depth
        half = rng.uniform(0.12, 0.3) * z
        shape = {"kind": SHAPE_KINDS[rng.integers(len(SHAPE_KINDS))], "centre": rng.uniform(-0.35, 0.35, 2) * z,
                 "half": half, "angle": rng.uniform(0, 2 * np.pi)}
        planes.append({"z": z, "texture": texture(), "shape": shape})
    return planes


def _inside(shape: dict, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    c, s = np.cos(shape["angle"]), np.sin(shape["angle"])
    dx, dy = x - shape["centre"][0], y - shape["centre"][1]
    u, v = (c * dx + s * dy) / shape["half"], (-s * dx + c * dy) / shape["half"]
    if shape["kind"] == "disc":
        return u * u + v * v <= 1
    if shape["kind"] == "square":
        return (np.abs(u) <= 0.8) & (np.abs(v) <= 0.8)
    # an equilateral triangle inscribed in the unit circle: three half-planes
    normals = [(np.cos(a), np.sin(a)) for a in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3)]
    return np.all([-(nx * u + ny * v) <= 0.5 for nx, ny in normals], axis=0)


def _shade(texture: dict, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    angles = x[..., None] * texture["freq"][:, 0] + y[..., None] * texture["freq"][:, 1]  # (..., 4)
    waves = np.sin(angles[..., None] + texture["phase"]) * texture["amp"]  # (..., 4, 3)
    return np.clip(texture["base"] + waves.sum(-2), 0, 1)


def _trace(planes, rotation, centre, focal, pixels_u, pixels_v, shade: bool = True):
    """For pixel coordinates (u, v) of a camera (world-to-camera `rotation`, `centre`): the depth along its axis,
    the 3D point and (when `shade`) the colour of the nearest plane hit (planes are z = const in the world)."""
    rays = np.stack([(pixels_u - focal[1]) / focal[0], (pixels_v - focal[2]) / focal[0], np.ones_like(pixels_u)], -1)
    world = rays @ rotation  # rotation.T applied to every camera-frame ray (its z component is 1: depth = lambda)
    depth = np.full(pixels_u.shape, np.inf)
    point = np.zeros(pixels_u.shape + (3,))
    nearest = np.zeros(pixels_u.shape, dtype=int)
    for index, plane in enumerate(planes):
        lam = (plane["z"] - centre[2]) / world[..., 2]
        hit = centre + lam[..., None] * world
        covered = lam > 0
        if plane["shape"] is not None:
            covered &= _inside(plane["shape"], hit[..., 0], hit[..., 1])
        nearer = covered & (lam < depth)
        depth = np.where(nearer, lam, depth)
        point = np.where(nearer[..., None], hit, point)
        nearest = np.where(nearer, index, nearest)
    if not shade:
        return depth, point, None
    colour = np.zeros(pixels_u.shape + (3,))
    for index, plane in enumerate(planes):  # each pixel shaded once, by the plane it sees
        seen = nearest == index
        colour[seen] = _shade(plane["texture"], point[seen][:, 0], point[seen][:, 1])
    return depth, point, colour


def render_pair(resolution: int, rng: np.random.Generator) -> dict:
    """One scene, two views: {"image", "reference"} (PIL), "depth" and "flow" of view 1 (see `build_view_pairs`)."""
    from PIL import Image

    planes = _random_scene(rng)
    focal = (float(resolution), resolution / 2, resolution / 2)  # (f, cx, cy): about 53 degrees of view
    cameras = [(np.eye(3), np.zeros(3)),
               (_rotation(*rng.uniform(-0.08, 0.08, 3)),
                np.array([rng.uniform(-0.6, 0.6), rng.uniform(-0.3, 0.3), rng.uniform(-0.5, 0.8)]))]
    n = resolution * _SUPERSAMPLE
    fine = (np.arange(n) + 0.5) / _SUPERSAMPLE
    views = []
    for rotation, centre in cameras:
        u, v = np.meshgrid(fine, fine)
        colour = _trace(planes, rotation, centre, focal, u, v)[2]
        colour = colour.reshape(resolution, _SUPERSAMPLE, resolution, _SUPERSAMPLE, 3).mean((1, 3))
        views.append(Image.fromarray(np.round(colour * 255).astype(np.uint8)))
    centres = np.arange(resolution) + 0.5
    u, v = np.meshgrid(centres, centres)
    depth, point, _ = _trace(planes, *cameras[0], focal, u, v, shade=False)
    rotation, centre = cameras[1]
    in_view_2 = (point - centre) @ rotation.T
    u2 = focal[0] * in_view_2[..., 0] / in_view_2[..., 2] + focal[1]
    v2 = focal[0] * in_view_2[..., 1] / in_view_2[..., 2] + focal[2]
    flow = np.stack([u2 - u, v2 - v]).astype(np.float32)
    return {"image": views[0], "reference": views[1], "depth": depth.astype(np.float32), "flow": flow}


__all__ = ["SHAPE_KINDS", "build_view_pairs", "render_pair"]
