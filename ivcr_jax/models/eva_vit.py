"""EVA-CLIP ViT-g/14, the frozen image encoder of InterLLaVA, followed by `ln_vision`.

Matches LAVIS `create_eva_vit_g` as used by the official code (reference §1.1): pre-LN blocks
(LayerNorm eps 1e-6), q/v-only qkv bias, exact GELU, learned absolute position embedding after
the cls token, no final norm. `ln_vision` (eps 1e-5) is computed in float32 as LAVIS does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ivcr_jax import sharding
from ivcr_jax.bicubic import bicubic_matrix
from ivcr_jax.models import layers

# CLIP pixel statistics used by the official `NormalizeVideo`.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_normalize(frames: jax.Array, dtype=jnp.float32) -> jax.Array:
  """uint8 RGB frames `[..., H, W, 3]` -> CLIP-normalised floats (done on device: 4x less I/O)."""
  x = frames.astype(jnp.float32) / 255.0
  x = (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)
  return x.astype(dtype)


class VitBlock(nnx.Module):
  """x += attn(norm1(x)); x += mlp(norm2(x))."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, attention_impl: str, dtype, param_dtype,
               rngs: nnx.Rngs):
    width, heads = cfg.width, cfg.heads
    head_dim = width // heads
    norm = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    dense = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.heads = heads
    self.attention_impl = attention_impl
    self.norm1 = layers.layer_norm(width, cfg.ln_eps, **norm)
    # One fused projection: [embed, (q,k,v), heads, head_dim]. The k slice of `qkv_bias` is zero in
    # every checkpoint and has no effect on attention (softmax is invariant to q.b_k).
    self.qkv = layers.Dense(width, (3, heads, head_dim), axes=("embed", None, "heads", "head_dim"),
                            use_bias=False, **dense)
    self.qkv_bias = layers.param(rngs, nnx.initializers.zeros, (3, heads, head_dim),
                                 (None, "heads", "head_dim"), param_dtype)
    self.proj = layers.Dense((heads, head_dim), width, axes=("heads", "head_dim", "embed"), **dense)
    self.norm2 = layers.layer_norm(width, cfg.ln_eps, **norm)
    self.fc1 = layers.Dense(width, cfg.mlp_dim, axes=("embed", "mlp"), **dense)
    self.fc2 = layers.Dense(cfg.mlp_dim, width, axes=("mlp", "embed"), **dense)

  def __call__(self, x: jax.Array) -> jax.Array:
    qkv = self.qkv(self.norm1(x)) + self.qkv_bias[...].astype(x.dtype)
    x = x + self.proj(layers.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2],
                                       impl=self.attention_impl))
    return x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x)), approximate=False))


class EvaViT(nnx.Module):
  """Images `[N, H, W, 3]` (CLIP-normalised) -> `ln_vision(ViT(x))` `[N, 1 + (H/p)^2, width]`."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, dtype=jnp.float32,
               param_dtype=jnp.float32, attention_impl: str = "xla", trained: bool = False,
               rngs: nnx.Rngs):
    """`trained`: whether the ViT is differentiated (else `cfg.remat_policy` is ignored: a
    frozen ViT keeps no activations for a backward pass, so remat would only recompute)."""
    self.cfg = cfg
    self.remat_policy = cfg.remat_policy if trained else "none"
    layers.remat_policy(cfg.remat_policy)  # validated either way
    self.dtype = dtype
    width, patch = cfg.width, cfg.patch_size
    grid = cfg.image_size // patch
    self.patch_embed = layers.Dense((patch, patch, 3), width, axes=(None, None, None, "embed"),
                                    dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.cls_token = layers.param(rngs, nnx.initializers.normal(0.02), (1, 1, width),
                                  (None, None, "embed"), param_dtype)
    self.pos_embed = layers.param(rngs, nnx.initializers.normal(0.02), (1, 1 + grid * grid, width),
                                  (None, None, "embed"), param_dtype)
    self.blocks = layers.stacked(
        cfg.depth, lambda r: VitBlock(cfg, attention_impl=attention_impl, dtype=dtype,
                                      param_dtype=param_dtype, rngs=r), rngs)
    # ln_vision: statistics and output in float32 (LAVIS `Blip2Base.LayerNorm`), eps 1e-5.
    self.ln_vision = layers.layer_norm(width, cfg.ln_vision_eps, dtype=jnp.float32,
                                       param_dtype=param_dtype, rngs=rngs)

  def patchify(self, images: jax.Array) -> jax.Array:
    """`[N, H, W, C]` -> `[N, (H/p)*(W/p), p, p, C]`: the stride-p convolution as one matmul."""
    n, h, w, c = images.shape
    p = self.cfg.patch_size
    if h % p or w % p:
      raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    x = images.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (h // p) * (w // p), p, p, c)

  def __call__(self, images: jax.Array) -> jax.Array:
    n = images.shape[0]
    images = sharding.constrain(images, ("batch",))  # frames split over the data axes
    x = self.patch_embed(self.patchify(images.astype(self.dtype)))
    cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (n, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1)
    if x.shape[1] != self.pos_embed.shape[1]:
      raise ValueError(
          f"{x.shape[1]} tokens but the position embedding has {self.pos_embed.shape[1]}; "
          "resize it "
          "with ivcr_jax.models.eva_vit.resize_pos_embed for other image sizes")
    x = x + self.pos_embed[...].astype(x.dtype)
    x = layers.scan_layers(self.blocks, x,
                           lambda blk, h, _: sharding.constrain(blk(h), ("batch",)),
                           num_layers=self.cfg.depth, dropout_key=None,
                           remat_policy=self.remat_policy,
                           unroll=not self.cfg.scan_layers)
    return sharding.constrain(self.ln_vision(x.astype(jnp.float32)), ("batch",))


def flops_per_image(cfg: ml_collections.ConfigDict) -> float:
  """Forward matmul FLOPs of one image (2 per multiply-add), for throughput benchmarks."""
  tokens = 1 + (cfg.image_size // cfg.patch_size) ** 2
  w, m = cfg.width, cfg.mlp_dim
  patch = 2 * (tokens - 1) * cfg.patch_size**2 * 3 * w
  per_block = 2 * tokens * (3 * w * w + w * w + 2 * w * m) + 2 * 2 * tokens * tokens * w
  return float(patch + cfg.depth * per_block)


def resize_pos_embed(pos_embed: np.ndarray, new_grid: int) -> np.ndarray:
  """Resizes a `[1, 1 + g*g, D]` position embedding to a `new_grid` square grid.

  torch-compatible bicubic (`F.interpolate(mode='bicubic', align_corners=False)`, A = -0.75,
  border clamped), as HF `interpolate_pos_encoding` and LAVIS `interpolate_pos_embed` do; the
  cls row is kept. Runs on the host at load time, so the jitted model keeps static shapes.
  """
  cls, grid_tokens = pos_embed[:, :1], pos_embed[:, 1:]
  old = int(round(grid_tokens.shape[1] ** 0.5))
  if old * old != grid_tokens.shape[1]:
    raise ValueError(f"position embedding with {grid_tokens.shape[1]} patch rows is not square")
  if old == new_grid:
    return pos_embed
  dim = grid_tokens.shape[-1]
  grid = grid_tokens.reshape(old, old, dim).astype(np.float64)
  weights = bicubic_matrix(old, new_grid)
  out = np.einsum("ia,jb,abd->ijd", weights, weights, grid).reshape(1, new_grid * new_grid, dim)
  return np.concatenate([cls, out.astype(pos_embed.dtype)], axis=1)
