"""InterLLaVA configurations (installed with the package; `configs/interllava.py` in a checkout
re-exports this module, and the entry points resolve that documented path to this file).

`--config=configs/interllava.py[:PRESET]`, PRESET one of:
  official  the 2025 official code's settings (reference §7): 7B, 64 frames per video (default)
  paper     the paper's setting: 12 frames per retrieval candidate, 96 for moments, wd 1e-6
  small     the benchmark config of SPEC §5 (same work for every measurement)
  tiny      minimal dimensions for unit tests
  demo      the CPU end-to-end run on the toy corpus
Override any field from the command line, e.g. `--config.model.vit.depth=3`.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from ivcr_jax.models import trainable

PRESETS = ("official", "paper", "small", "tiny", "demo")

# Logical axis name -> mesh axis (or axes) it is sharded over; unlisted names are replicated.
# A mesh axis is used at most once per array, and an axis that does not divide a dimension
# falls back to replication (see ivcr_jax.sharding).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("head_dim", None),
    ("norm", None),
    ("lora_rank", None),
)


def _model() -> ml_collections.ConfigDict:
  """The official 2025 architecture (reference §1)."""
  m = ml_collections.ConfigDict()
  m.dtype = "bfloat16"  # compute dtype (official: fp16 autocast)
  m.param_dtype = "float32"  # trainable (master) weights
  m.frozen_param_dtype = "bfloat16"  # frozen ViT and LLaMA base weights
  # Parts ("vision", "llm") whose dense kernels are drawn with std 1/sqrt(fan_in) instead of the
  # official modules' 0.02; only matters when training from scratch (see layers.fan_in_init).
  m.fan_in_init = ()
  # Each stack's `remat_policy` (layers.remat) chooses the activations kept for the backward
  # pass: "none" | "full" (recompute everything) | "minimal" (keep matmul outputs) | "offload"
  # (minimal, kept in pinned host memory).
  # Attention of every stack (layers.attention): "xla" (portable) | "cudnn" (fused GPU kernel,
  # bf16/fp16) | "tpu_splash" (Pallas splash kernel) | "auto" (per backend: TPU splash, GPU
  # cuDNN for bf16/fp16, else xla). Dropout (Q-Former training) and decoding always run on xla.
  m.attention_impl = "auto"

  m.vit = ml_collections.ConfigDict(dict(
      image_size=224, patch_size=14, width=1408, depth=39, heads=16, mlp_dim=6144,
      ln_eps=1e-6, ln_vision_eps=1e-5,
      remat_policy="none",  # only when the ViT is trained (demo); a frozen ViT has no backward
      scan_layers=True))  # lax.scan over blocks (False: unrolled)

  # One hidden size for both Q-Formers (the video Q-Former reads the image Q-Former's output).
  hidden = config_dict.FieldReference(768)
  m.qformer = ml_collections.ConfigDict(dict(
      hidden=hidden, depth=12, heads=12, mlp_dim=3072, num_query_tokens=32,
      cross_attention_freq=2, vocab_size=30523, max_position=512, ln_eps=1e-12,
      dropout=0.1, attention_dropout=0.1, text_input=True, remat_policy="minimal"))
  m.video = ml_collections.ConfigDict(dict(
      max_frame_pos=64, window=32, stride=32,
      # The ViT and image Q-Former run over the frame table in this many sequential chunks
      # (each rematerialised by its stack's remat_policy): their activations exist one chunk
      # at a time. 1: the whole table at once. With 8 and minimal Q-Former remat the 7B step of
      # 8 samples plans 45 GB/device on 8 devices instead of 95 (scripts/plan_7b.py).
      frame_chunks=8,
      # Official (bug B3): the video Q-Former attends to the image Q-Former's text positions too.
      attend_qformer_text=True))
  m.video_qformer = ml_collections.ConfigDict(dict(
      hidden=hidden, depth=2, heads=12, mlp_dim=3072, num_query_tokens=32,
      cross_attention_freq=1, ln_eps=1e-12, dropout=0.1, attention_dropout=0.1,
      remat_policy="minimal"))

  m.llm = ml_collections.ConfigDict(dict(
      vocab_size=32005,  # Llama-2's 32000 + <VID> </VID> <VIDEO> </VIDEO> <VIDEOTOKEN>
      hidden=4096, depth=32, heads=32, kv_heads=32, head_dim=128, mlp_dim=11008,
      rms_eps=1e-5, rope_theta=10000.0, rope_scaling_factor=1.0, max_position=4096,
      remat_policy="full", scan_layers=True))
  m.lora = ml_collections.ConfigDict(dict(
      rank=32, alpha=32.0, dropout=0.1, targets=("q_proj", "k_proj", "v_proj", "o_proj")))
  # Parameter groups that are trained (ivcr_jax.models.trainable.GROUPS); the rest is frozen.
  m.trainable = trainable.OFFICIAL
  return m


def _data() -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict()
  d.frames_retrieval = 64  # frames per retrieval candidate (official: 64 for every video, B5)
  d.frames_moment = 64  # frames of a moment-retrieval video
  d.sample_train = "rand"  # official random per-interval sampling with its fallback
  d.sample_eval = "uniform"  # deterministic evaluation (the official eval is random, B6)
  # How the frame store was decoded (data_prep.build_stores --resize; checked against the store):
  # "squash" to size x size (official decord call, aspect ratio not kept) | "shorter_side_crop"
  # (shorter side to size, centre crop).
  d.resize_mode = "squash"
  # Training augmentation on the host (before CLIP normalisation): one random resized crop per
  # video, shared by its frames, bicubic back to the ViT size, seeded by (seed, epoch, video).
  # Official: always on, in evaluation too (B6); here evaluation never crops.
  d.random_resized_crop = False
  d.crop_scale = (0.5, 1.0)  # area fraction (official AlproVideoTrainProcessor)
  d.crop_ratio = (3 / 4, 4 / 3)  # aspect ratio (official: torchvision's default)
  d.num_candidates = 10
  # Candidate lists of the turns: "annotation" (`candidate_videos`, the official X-Pool top-10)
  # or the path of a top-k cache (python -m data_prep.build_topk_cache) of another retriever.
  d.candidates = "annotation"
  # Records (ivcr_jax.data.records). "" annotations: the toy corpus (demo, tests).
  d.annotations = ""  # IVCR-200K annotation JSON
  d.video_root = ""  # the directory its video paths are relative to
  # Frame + dialogue stores (data_prep.build_stores); toy presets: "" means <workdir>/toy_data
  # (toy_data_seed<N> for another toy_seed, so evaluating on a new corpus never overwrites it).
  d.stores = ""
  # A feature store (data_prep.build_feature_store) of the model's own frozen ViT: training reads
  # post-ViT features instead of frames and skips the ViT. "": frames.
  d.features = ""
  d.sample_mode = "dialogue"  # "dialogue": all answers in one sequence | "prefix": official
  d.max_turns = 7  # official: prefixes of <= 7 turns
  d.long_dialogues = "truncate"  # longer dialogues: "truncate" (official effect) | "skip"
  d.moment_index_fallback = "candidates"  # "none": "<VID> None </VID>" as official (B20)
  d.span_tolerance_s = 1.0  # max distance between a moment answer's span and gt_se
  d.chat_turns = True  # natural-dialogue turns (gt_se null; an extension of the schema)
  # Static batch shapes: sequence lengths and video-table sizes are rounded up to these buckets
  # (one compilation per bucket pair); the last sequence bucket is the longest sequence allowed.
  d.seq_buckets = (1024, 2048, 4096)
  # Sizes of the global video table (P processes hold 1/P of it each). 1: a moment-only
  # sample's one video; 10: a retrieval-only turn's candidates; 11: both.
  d.video_buckets = (1, 10, 11, 22, 44, 88)
  # Sizes of the global frame table: the batch's real frames, packed (no padding frames when
  # retrieval and moment frame counts differ). (): the video buckets times the most frames of a
  # video (every video full length: official, where both counts are 64).
  d.frame_buckets = ()
  d.max_digits = 6  # digits per number located for the aux losses
  # Tokenizers (ivcr_jax.data.tokenizer). "" tokenizer: the toy tokenizer (built offline).
  d.tokenizer = ""  # Hugging Face tokenizer directory of the LLM
  d.qformer_tokenizer = ""  # "": the LLM tokenizer's ids as BERT ids (official B1); or a dir
  d.qformer_text_len = 32  # timestamp text tokens per frame (official max_length 32)
  d.qformer_last_frame_quirk = True  # last frame "... seconds second." (official B2)
  # Toy corpus (ivcr_jax.data.toy_corpus)
  d.toy_num_videos = 300
  d.toy_seed = 0
  d.toy_size = 64  # frame side of the toy mp4 files (a multiple of 32)
  d.toy_retriever_noise = 1.0  # 1: look-alike distractors (hard); larger: nearly random ones
  d.toy_fps = 3.0  # frames per second of the toy videos
  d.toy_seconds = (8.0, 30.0)  # their shortest and longest duration
  return d


def _train() -> ml_collections.ConfigDict:
  t = ml_collections.ConfigDict()
  t.num_steps = 250_000  # micro-steps: 5 epochs x 50,000 iterations
  t.batch_size = 1  # per micro-step, global
  t.grad_accum = 4
  t.lr = 3e-5
  t.min_lr = 1e-5
  t.warmup_lr = 1e-6
  t.warmup_steps = 50_000
  t.weight_decay = 0.05  # on ndim >= 2 parameters without bias/norm in the name (official)
  t.b1 = 0.9
  t.b2 = 0.999
  t.eps = 1e-8
  t.grad_clip = 0.0  # 0 disables clipping (official: none)
  t.alpha = 0.01  # weight of L_V (video-index cross-entropy); 0 with beta=0: official dynamics
  t.beta = 0.01  # weight of L_C (1 - IoU of the moment span)
  t.span_loss = "giou"  # "iou" | "giou" | "diou" (giou/diou keep a gradient on disjoint spans)
  # L_M's logits exist for this many positions at a time (recomputed in the backward pass),
  # never as one [B, S, vocab] float32 array; 0: all positions at once.
  t.lm_loss_chunk = 512
  t.log_every = 50
  t.eval_every = 5000  # validation loss every N micro-steps (0: never)
  t.checkpoint_every = 5000
  t.keep_checkpoints = 3
  # End this invocation after this micro-step (0: at num_steps), with a checkpoint there; the
  # schedule stays num_steps' and the same command resumes (time-sliced jobs, tests).
  t.stop_after = 0
  t.evaluate_after = False  # generate + score the test split when training ends (demo: on)
  return t


def _weights() -> ml_collections.ConfigDict:
  """Local files of the official initialisation chain (reference §6.3); see README "Weights"."""
  return ml_collections.ConfigDict(dict(
      eva_vit="weights/eva_vit_g.pth",
      instructblip="weights/instruct_blip_vicuna7b_trimmed.pth",
      llama="weights/Llama-2-7b-chat-hf",
      timechat="weights/timechat_7b.pth",
      videollama="weights/VL_LLaMA_2_7B_Finetuned.pth",
      ivcr="",  # a trained official IVCR checkpoint (evaluation only)
      init_checkpoint="weights/interllava_init",  # orbax checkpoint built from the files above
  ))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset = arg or "official"
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.seed = 21
  # JAX's persistent compilation cache ("": off): restarts reuse the compiled step of every
  # bucket triple. On for the accelerator presets (official, paper), where one compile takes
  # minutes; the CPU presets compile in seconds.
  c.jax_compilation_cache_dir = ""
  c.model = _model()
  c.data = _data()
  c.train = _train()
  c.weights = _weights()
  c.generation = ml_collections.ConfigDict(dict(
      max_new_tokens=1024, do_sample=False, temperature=0.6, top_p=0.9, seed=42))
  c.evaluation = ml_collections.ConfigDict(dict(
      official_parsing=False, official_denominators=False))
  c.mesh = ml_collections.ConfigDict(dict(
      axes=("data", "fsdp", "tensor"),
      shape=(1, -1, 1),  # -1: all remaining devices
      rules=DEFAULT_RULES))

  if preset in ("official", "paper"):
    c.jax_compilation_cache_dir = "~/.cache/ivcr_jax/jax_compilation_cache"
    c.data.annotations = "data/IVCR-200K/IVCR-200K.json"
    c.data.video_root = "data/IVCR-200K/videos"
    c.data.stores = "data/ivcr_stores"
    c.data.tokenizer = c.weights.llama
  if preset == "paper":
    c.data.frames_retrieval = 12
    c.data.frames_moment = 96
    # A moment-only sample (96), a retrieval turn (10 x 12), both (216), two of each, ...; the
    # last holds the largest video table of full-length videos (88 x 96).
    c.data.frame_buckets = (96, 120, 216, 432, 864, 1728, 3456, 8448)
    c.model.video.max_frame_pos = 96
    c.train.weight_decay = 1e-6
  elif preset in ("small", "tiny", "demo"):
    _shrink(c, preset)
  return c.lock()


def _shrink(c: ml_collections.ConfigDict, preset: str) -> None:
  """CPU-sized models; `small` is SPEC §5's benchmark config."""
  m = c.model
  m.dtype = m.param_dtype = m.frozen_param_dtype = "float32"
  m.vit.update(dict(width=256, depth=4, heads=4, mlp_dim=1117))
  m.qformer.update(dict(hidden=256, depth=4, heads=4, mlp_dim=1024, remat_policy="none"))
  m.video_qformer.update(dict(heads=4, mlp_dim=1024, remat_policy="none"))
  m.video.frame_chunks = 1
  m.llm.update(dict(hidden=256, depth=4, heads=4, kv_heads=4, head_dim=64, mlp_dim=688,
                    remat_policy="none"))
  if preset == "small":
    return
  # tiny and demo: small enough for unit tests and a CPU training run in minutes.
  m.vit.update(dict(image_size=32, patch_size=8, width=64, depth=2, heads=4, mlp_dim=128))
  m.qformer.update(dict(hidden=64, depth=2, heads=4, mlp_dim=128, num_query_tokens=8,
                        max_position=64))
  m.video.update(dict(max_frame_pos=16, window=8, stride=8))
  m.video_qformer.update(dict(heads=4, mlp_dim=128, num_query_tokens=8))
  m.llm.update(dict(hidden=64, depth=2, heads=4, kv_heads=2, head_dim=16, mlp_dim=128,
                    max_position=2048))
  m.lora.update(dict(rank=8, alpha=16.0))
  c.data.frames_retrieval = c.data.frames_moment = 16
  c.data.seq_buckets = (1024,)  # one sequence bucket and two table sizes: few compilations
  c.data.video_buckets = (48, 96)
  c.data.max_turns = 4
  c.data.qformer_text_len = 20  # the toy timestamp texts are at most ~17 tokens
  c.weights.init_checkpoint = ""
  c.generation.max_new_tokens = 96  # toy answers are ~40 tokens
  if preset == "demo":  # trained from scratch: there are no pretrained weights to freeze
    c.train.evaluate_after = True
    m.fan_in_init = ("vision",)
    m.trainable = ("vit", "qformer", "query_tokens", "frame_position_embedding", "video_qformer",
                   "video_query_tokens", "projection", "llm", "lora")
  c.train.update(dict(num_steps=200, grad_accum=1, lr=1e-3, min_lr=1e-4, warmup_lr=1e-5,
                      warmup_steps=20, batch_size=4))
  if preset == "demo":
    # Measured on the toy corpus (README "The demo"): 8 frames per video halve the vision work;
    # LR 3e-3 reaches val L_M 0.79 in 300 steps (1e-3: 1.31); from scratch the aux terms are the
    # only direct signal on the index and span digits, so they get weight 1.
    c.data.frames_retrieval = c.data.frames_moment = 8
    c.train.update(dict(num_steps=300, lr=3e-3, min_lr=3e-4, alpha=1.0, beta=1.0))
