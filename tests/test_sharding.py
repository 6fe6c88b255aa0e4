"""Frame-axis sharding on 8 host CPU devices: the same seed gives the same video on 1 device and on a mesh.
(The real UNet3D is checked the same way through the CLI in ``test_cli.py``.)

Tolerance: max |sharded - unsharded| below 1 on the [0, 255] scale (the frames compared in float32 before
rounding); measured values are about 1e-5 of that.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxlongvid import sampling, schedulers, sharding
from test_sampling import PROMPTS, StandInConfig, make_pipeline

FRAMES = 24


@pytest.fixture(scope="module")
def pipe():
    assert len(jax.devices()) >= 8, "tests/conftest.py should give 8 host devices"
    return make_pipeline()


def _on_255_scale(video):
    return (np.asarray(video, np.float64) + 1.0) * 127.5


@pytest.mark.parametrize("method,mesh_shape,eta", [
    ("direct", 8, None),  # devices=8: the sampler builds frames 4 x data 2
    ("freenoise", (8, 1), None),
    ("freelong", (8, 1), None),
    ("longdiff", (4, 2), 1.0),  # with DDIM noise (eta 1): the per-step noise must not depend on the layout
    ("freeloc", (4, 2), None),
])
def test_sharded_equals_unsharded(pipe, method, mesh_shape, eta):
    kw = dict(num_frames=FRAMES, method=method, seed=11, eta=eta, progress=False, output="float")
    single = sampling.sample(pipe, PROMPTS[0], **kw)
    if isinstance(mesh_shape, int):  # also: the step-by-step loop under the progress bar, sharded
        sharded = sampling.sample(pipe, PROMPTS[0], devices=mesh_shape, **dict(kw, progress=True))
    else:
        sharded = sampling.sample(pipe, PROMPTS[0], mesh=sharding.make_mesh(*mesh_shape), **kw)
    diff = np.max(np.abs(_on_255_scale(sharded) - _on_255_scale(single)))
    print(f"{method} on {mesh_shape}: max diff {diff:.2e} on the [0, 255] scale")
    assert diff < 1.0, diff
    assert np.std(_on_255_scale(single)) > 5  # a real picture, not a constant


def test_latents_are_split_over_frames(pipe):
    mesh = sharding.make_mesh(4, 2)
    request = sampling.check_request(pipe, PROMPTS[0], num_frames=FRAMES)
    schedule = schedulers.make_schedule(pipe.config.scheduler, request.num_inference_steps)
    latents = sampling._generate(pipe, request, schedule, mesh, progress=False)
    assert latents.sharding.spec == P(None, sharding.FRAMES)
    assert {s.data.shape[1] for s in latents.addressable_shards} == {FRAMES // 4}
    assert len(latents.addressable_shards) == 8
    noise = sampling._noise((1, FRAMES, 8, 8, 3), request.method, mesh)(np.uint32(0))
    assert {s.data.shape[1] for s in noise.addressable_shards} == {FRAMES // 4}


def test_latent_pipeline_sharded_decode():
    """The VAE decodes each device's own frames (shard_map over frames and data)."""
    from jaxlongvid.models import vae as vae_lib

    vae_config = vae_lib.VAEConfig(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4)
    pipe = make_pipeline(unet=StandInConfig(in_channels=4), vae=vae_config)
    kw = dict(num_frames=16, height=16, width=16, seed=4, progress=False, output="float", decode_chunk=1)
    single = sampling.sample(pipe, PROMPTS[0], **kw)
    sharded = sampling.sample(pipe, PROMPTS[0], mesh=sharding.make_mesh(4, 2), **kw)
    assert single.shape == (16, 16, 16, 3)
    diff = np.max(np.abs(_on_255_scale(sharded) - _on_255_scale(single)))
    print(f"VAE pipeline on (4, 2): max diff {diff:.2e} on the [0, 255] scale")
    assert diff < 1.0, diff


# ---- meshes that do not fit: errors before anything is traced ----------------------------------------------------
def test_frames_not_divisible_by_the_mesh(pipe, no_tracing):
    with pytest.raises(ValueError, match=r"num_frames=20 is not divisible by the mesh's 'frames' axis \(8"):
        sampling.sample(pipe, PROMPTS[0], num_frames=20, mesh=sharding.make_mesh(8, 1), progress=False)
    with pytest.raises(ValueError, match=r"num_frames=18 is not divisible .* \(4 devices\)"):
        sampling.sample(pipe, PROMPTS[0], num_frames=18, devices=8, progress=False)  # guided: 4 x 2


def test_other_bad_meshes(pipe, no_tracing):
    with pytest.raises(ValueError, match="model batch of 1 .* not divisible by the mesh's 'data' axis"):
        sampling.sample(pipe, PROMPTS[0], num_frames=8, guidance_scale=1.0, mesh=sharding.make_mesh(4, 2),
                        progress=False)
    with pytest.raises(ValueError, match="asked for 16 devices but only 8"):
        sampling.sample(pipe, PROMPTS[0], num_frames=16, devices=16, progress=False)
    with pytest.raises(ValueError, match="not both"):
        sampling.sample(pipe, PROMPTS[0], mesh=sharding.make_mesh(8), devices=8, progress=False)
    odd = jax.make_mesh((8,), ("pixels",))
    with pytest.raises(ValueError, match="cannot use \\['pixels'\\] \\(pass mesh_axes="):
        sampling.sample(pipe, PROMPTS[0], num_frames=8, mesh=odd, progress=False)
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        sampling.sample(pipe, PROMPTS[0], num_frames=8, mesh="frames", progress=False)


# ---- meshes as users build them ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["direct", "freenoise", "freelong", "longdiff", "freeloc"])
def test_default_jax_mesh_equals_unsharded(pipe, method):
    """``jax.make_mesh((8,), ("frames",))`` (explicit axis types in current JAX) samples the unsharded video to
    within 1 grey level (compared in uint8, as the user sees it)."""
    mesh = jax.make_mesh((8,), ("frames",))
    assert jax.sharding.AxisType.Explicit in mesh.axis_types
    kw = dict(num_frames=16, num_inference_steps=2, method=method, seed=3, progress=False)
    single = sampling.sample(pipe, PROMPTS[1], **kw)
    sharded = sampling.sample(pipe, PROMPTS[1], mesh=mesh, **kw)
    diff = int(np.max(np.abs(sharded.astype(int) - single.astype(int))))
    print(f"{method} on jax.make_mesh((8,), ('frames',)): max diff {diff} grey levels")
    assert diff <= 1, diff
    assert single.std() > 5


def test_normalise_mesh_shapes_and_names():
    sizes = lambda m: (dict(zip(m.axis_names, m.axis_sizes)), m.axis_types)
    auto = (jax.sharding.AxisType.Auto,) * 2
    assert sizes(sharding.normalise_mesh(jax.make_mesh((8,), ("frames",)))) == ({"frames": 8, "data": 1}, auto)
    two = jax.make_mesh((2, 4), ("data", "frames"))  # data first: transposed to (frames, data), same devices
    norm = sharding.normalise_mesh(two)
    assert sizes(norm) == ({"frames": 4, "data": 2}, auto)
    np.testing.assert_array_equal(norm.devices, two.devices.T)
    named = sharding.normalise_mesh(jax.make_mesh((4, 2, 1), ("t", "cfg", "x")), axes=("t", "cfg"))
    assert sizes(named) == ({"frames": 4, "data": 2}, auto)
    with pytest.raises(ValueError, match="mesh_axes must name"):
        sharding.normalise_mesh(two, axes=("a", "b", "c"))


def test_mesh_for_devices():
    sizes = lambda m: dict(zip(m.axis_names, m.axis_sizes))
    assert sizes(sharding.mesh_for_devices(8)) == {"frames": 4, "data": 2}
    assert sizes(sharding.mesh_for_devices(8, guided=False)) == {"frames": 8, "data": 1}
    assert sizes(sharding.mesh_for_devices(3)) == {"frames": 3, "data": 1}
    assert sizes(sharding.mesh_for_devices(jax.devices()[2:8])) == {"frames": 3, "data": 2}
    with pytest.raises(ValueError, match="devices must be >= 1"):
        sharding.mesh_for_devices(0)


def test_global_array_helpers():
    mesh = sharding.make_mesh(8)
    x = np.arange(2 * 16 * 3, dtype=np.float32).reshape(2, 16, 3)
    arr = sharding.put(x, sharding.named(mesh, P(None, sharding.FRAMES)))
    assert arr.sharding.spec == P(None, sharding.FRAMES)
    assert {s.data.shape for s in arr.addressable_shards} == {(2, 2, 3)}
    np.testing.assert_array_equal(sharding.to_host(arr), x)
    np.testing.assert_array_equal(sharding.to_host(sharding.put(x, None)), x)


def test_constrain_is_identity_without_mesh():
    x = jnp.ones((2, 8, 3))
    assert sharding.constrain(x, P(sharding.DATA, sharding.FRAMES)) is x
