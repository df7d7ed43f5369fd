//! The kernels' parameter block and launch geometry (tiles, head chunks, split-KV).

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg, sys};
use tch::{Device, Kind, Tensor};

use crate::Error;
use crate::decode::KernelPath;
use crate::runtime::{Kernels, Tile, Variant, kernels};

/// (token, head) pairs a block of the CUDA-core kernel keeps at most.
pub(crate) const MAX_PAIRS: i64 = 8;
/// (token, head) pairs a block of the tensor-core kernel keeps at most (`MMA_ROWS`).
const MMA_ROWS: i64 = 64;
/// Keys per shared-memory stage of the tensor-core kernel (`MMA_KT`).
const MMA_KT: i64 = 64;

/// Keys per shared-memory stage (the kernels' `Tile::KT`).
fn key_tile(hd: i64, elt: i64) -> i64 {
    match hd * elt {
        b if b <= 128 => 64,
        b if b <= 256 => 32,
        _ => 16,
    }
}
/// Warps per block (the kernels' `WARPS`).
const WARPS: i64 = 4;
/// Fewest keys worth a split of their own.
const MIN_SPLIT_KEYS: i64 = 256;

/// `struct Params` of `kernels/attention.cu`, field for field.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Params {
    pub q: u64,
    pub k_new: u64,
    pub v_new: u64,
    pub k_cache: u64,
    pub v_cache: u64,
    pub out: u64,
    pub part_o: u64,
    pub part_lse: u64,
    pub cu_q: u64,
    pub kv_len: u64,
    pub block_table: u64,
    pub cos: u64,
    pub sin: u64,
    pub seq_stride: i64,
    pub batch_stride: i64,
    pub batch_offset: i32,
    pub block_size: i32,
    pub bt_stride: i32,
    pub rot_half: i32,
    pub interleaved: i32,
    pub n_rows: i32,
    pub hq: i32,
    pub hkv: i32,
    pub group: i32,
    pub heads_per_chunk: i32,
    pub nchunks: i32,
    pub nsplit: i32,
    pub tokens_per_tile: i32,
    pub split_len: i32,
    pub total_tokens: i32,
    pub scale_log2: f32,
    /// Static cache: the launch runs a row's (group, chunk, split) blocks side by side.
    pub z_fastest: i32,
    /// Append: the launch's first token (its `cu_q` offsets count from the step's first).
    pub token0: i32,
}

#[expect(unsafe_code, reason = "kernel parameter block")]
// SAFETY: plain old data with the exact layout of the kernels' `struct Params`.
unsafe impl DeviceRepr for Params {}

/// `struct MergeParams` of `kernels/attention.cu`, field for field: two attentions of the same
/// queries over disjoint keys (`a`, `b`, `[tokens, heads, hd]` rows `*_stride` elements apart,
/// heads `hd` apart) with their natural-log log-sum-exps (`[heads, tokens]`, heads `lse_*_head`
/// apart), merged into `out`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct MergeParams {
    pub a: u64,
    pub b: u64,
    pub lse_a: u64,
    pub lse_b: u64,
    pub out: u64,
    pub a_stride: i64,
    pub b_stride: i64,
    pub out_stride: i64,
    pub lse_a_head: i64,
    pub lse_b_head: i64,
    pub tokens: i32,
    pub heads: i32,
}

#[expect(unsafe_code, reason = "kernel parameter block")]
// SAFETY: plain old data with the exact layout of the kernels' `struct MergeParams`.
unsafe impl DeviceRepr for MergeParams {}

/// The dtype part of kernel names.
pub(crate) fn dtype_name(kind: Kind) -> Result<&'static str, Error> {
    match kind {
        Kind::BFloat16 => Ok("bf16"),
        Kind::Half => Ok("f16"),
        Kind::Float => Ok("f32"),
        other => Err(Error::Unsupported(format!("dtype {other:?} (bfloat16, float16 or float32)"))),
    }
}

/// The kernels' softmax scale: `scale` x log2(e) as f32. The tensor-core kernel scales the raw
/// score maximum, so the scale must be positive (and stay so in f32).
pub(crate) fn scale_log2(scale: f64) -> Result<f32, Error> {
    let s = (scale * std::f64::consts::LOG2_E) as f32;
    if s.is_finite() && s > 0.0 {
        Ok(s)
    } else {
        Err(Error::Input(format!("softmax scale {scale}: must be positive and finite")))
    }
}

/// Head dimensions the kernels are built for.
pub(crate) fn check_head_dim(hd: i64) -> Result<(), Error> {
    if crate::KERNEL_HEAD_DIMS.contains(&hd) {
        Ok(())
    } else {
        Err(Error::Unsupported(format!("head dimension {hd} (32, 64, 128 or 256)")))
    }
}

/// The device index of a CUDA tensor.
pub(crate) fn cuda_index(name: &'static str, t: &Tensor) -> Result<usize, Error> {
    match t.device() {
        Device::Cuda(i) => Ok(i),
        d => Err(Error::Input(format!("{name} is on {d:?}, not a CUDA device"))),
    }
}

/// Requires a contiguous tensor of `kind` on `device` (the kernels read raw pointers).
pub(crate) fn check_tensor(
    name: &'static str,
    t: &Tensor,
    kind: Kind,
    device: Device,
) -> Result<(), Error> {
    if t.kind() != kind {
        return Err(Error::Input(format!("{name}: dtype {:?}, expected {kind:?}", t.kind())));
    }
    if t.device() != device {
        return Err(Error::Input(format!("{name}: on {:?}, expected {device:?}", t.device())));
    }
    if !t.is_contiguous() {
        return Err(Error::Input(format!("{name} must be contiguous")));
    }
    // Vector loads need 16-byte alignment; integer metadata is read element by element.
    if t.is_floating_point() && !(t.data_ptr() as usize).is_multiple_of(16) {
        return Err(Error::Input(format!("{name} is not 16-byte aligned")));
    }
    Ok(())
}

/// Launch geometry.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub n_rows: i64,
    /// Most new tokens of any row.
    pub max_q: i64,
    pub hkv: i64,
    pub group: i64,
    /// Keys of the longest row as the host knows them: what the split-KV is sized by.
    pub max_keys: i64,
    /// Keys a row can hold at most (the static cache's length): what the split count of a
    /// launch captured into a CUDA graph is sized by, since its replays may run at any length.
    pub capacity: i64,
    pub total_tokens: i64,
    /// Key/value heads per block the caller asks for (static decode; `None`: the launch picks,
    /// `heads_per_block`).
    pub heads_per_block: Option<i64>,
    /// Launch the split combine with programmatic stream serialization where the device has it
    /// (`queue`).
    pub programmatic: bool,
}

/// Whether the tensor-core builds exist for `kind` and `hd` (bf16/f16, head dimension 32, 64
/// or 128).
pub(crate) fn tensor_cores_apply(kind: Kind, hd: i64) -> bool {
    matches!(kind, Kind::BFloat16 | Kind::Half) && [32, 64, 128].contains(&hd)
}

/// Whether `path` runs on the tensor cores for this launch.
fn use_tensor_cores(
    paged: bool,
    path: KernelPath,
    kind: Kind,
    hd: i64,
    geo: &Geometry,
) -> Result<bool, Error> {
    let supported = tensor_cores_apply(kind, hd);
    match path {
        KernelPath::CudaCores => Ok(false),
        KernelPath::TensorCores if supported => Ok(true),
        KernelPath::TensorCores => Err(Error::Unsupported(format!(
            "the tensor-core kernel with {kind:?} and head dimension {hd} (bfloat16 or float16, 32, 64 or 128)"
        ))),
        // One query row per key/value head (MHA decode) wastes 15 of the MMA's 16 rows. Over
        // the static cache at head dimension 128 the bandwidth bound hides it (bf16: 0.3-2.3%
        // faster than the CUDA cores on three of the four bench shapes, 0.5% slower at
        // 128 x 1024, H100 and H200); over 16-token pages it does not (up to 8% slower), and
        // smaller head dimensions were not measured: those keep the CUDA cores.
        KernelPath::Auto => {
            Ok(supported && (geo.group * geo.max_q.max(1) > 1 || (!paged && hd == 128)))
        }
    }
}

/// Bytes of keys and values one block has in flight when the rule below was measured (the
/// bf16 head-dimension-128 tensor-core build: one stage of 64 keys, keys and values).
const REFERENCE_STAGE_BYTES: i64 = 2 * 64 * 128 * 2;

/// What the split-KV choice looks at.
#[derive(Debug, Clone, Copy)]
struct SplitInput {
    /// Blocks without splits (row tiles x key/value heads x head chunks).
    units: i64,
    sms: i64,
    /// Blocks resident at once (multiprocessors x resident blocks).
    slots: i64,
    /// Key and value bytes of one shared-memory stage.
    stage_bytes: i64,
    /// Keys of the longest row.
    keys: i64,
    /// Keys per stage.
    kt: i64,
    /// Most splits (splits of at least `MIN_SPLIT_KEYS` keys).
    max_splits: i64,
    /// Paged cache with blocks smaller than a stage (each stage gathers several pages).
    gathered: bool,
}

/// How many splits the keys of `units` blocks get.
///
/// Decode streams keys and values: it needs enough bytes in flight, and every split costs a
/// block start, partial rows and the combine. Measured on an H200 (bf16, head dim 128):
/// - in one wave, about two blocks per multiprocessor with 32 KB stages saturate DRAM (128,
///   192, 256, 384 blocks: 79, 90, 94, 93% of the copy bandwidth), more splits only cost (256
///   requests x 8 heads: 96% unsplit, 87% in three splits of two waves); stages that gather
///   16-token pages want half as many again (3 per multiprocessor: 92% against 88% at 2);
/// - with more blocks than slots, one split is right when the last wave alone has enough
///   blocks or there are many waves (4096 blocks in 5.2 waves: 102%); a few waves with a thin
///   last one (the CUDA-core build's 1024 blocks in 1.3 waves: 88%, 98% in three splits) are
///   left to the wave cost of `wave_split`.
///
/// So: with fewer blocks than `enough` (5% short of two per multiprocessor of the reference
/// stage size, proportionally more for smaller stages), of the split counts that reach it in
/// one wave the one that loads the busiest multiprocessor least (blocks per multiprocessor,
/// rounded up, times keys per split plus a block's overhead: 12 requests x 8 heads x 4096
/// keys in 4 splits, 384 blocks, ran 8% faster on an H200 than in the 3 that merely reach
/// `enough` and leave 24 multiprocessors a third block); one split when the blocks already
/// fill the machine as above; `wave_split` otherwise.
fn split_count(s: SplitInput) -> i64 {
    let (units, slots, max_splits) = (s.units.max(1), s.slots.max(1), s.max_splits.max(1));
    let enough = enough_blocks(&s);
    if units < enough {
        // Of the split counts that give enough blocks in one wave, the one that loads the
        // busiest multiprocessor least: blocks per multiprocessor (rounded up) x (keys per
        // split + a block's overhead).
        let least = (enough + units - 1) / units;
        let most = (slots / units).min(max_splits).max(1);
        if least >= most {
            return most;
        }
        let sms = s.sms.max(1);
        let overhead = WAVE_SPLIT_OVERHEAD_TILES * s.kt;
        let keys = s.keys.max(1);
        let cost = |n: i64| ((units * n + sms - 1) / sms * ((keys + n - 1) / n + overhead)) as f64;
        let best = (least..=most).map(cost).fold(f64::INFINITY, f64::min);
        return (least..=most).find(|&n| cost(n) <= 1.01 * best).unwrap_or(least);
    }
    if fills_machine(units, slots, enough) {
        return 1;
    }
    wave_split(units, slots, s.keys, max_splits, WAVE_SPLIT_OVERHEAD_TILES * s.kt)
}

/// Blocks that keep DRAM busy in one wave (`split_count`): 5% short of two per multiprocessor
/// of the reference stage size, proportionally more for smaller stages, half as many again
/// for stages that gather pages; at most the slots.
fn enough_blocks(s: &SplitInput) -> i64 {
    let slots = s.slots.max(1);
    let mut wanted = 2 * s.sms.max(1) * REFERENCE_STAGE_BYTES / s.stage_bytes.max(1);
    if s.gathered {
        wanted = wanted * 3 / 2;
    }
    let wanted = wanted.clamp(1, slots);
    (wanted * 19 + 19) / 20
}

/// Whether `units` blocks, unsplit, keep the machine busy to the end: at least `enough`, and
/// one wave, many waves (4 or more) or a last wave of at least `enough` blocks.
fn fills_machine(units: i64, slots: i64, enough: i64) -> bool {
    let tail = units % slots.max(1);
    units >= enough && (units <= slots || units >= 4 * slots || tail == 0 || tail >= enough)
}

/// Key/value heads per block of the static decode build (`attn_static_*_mma16g{2,4}`): a block
/// of GPB neighbouring heads of one batch row streams GPB x head_dim contiguous elements per
/// position, with one prologue and one merge for all of them, so the same bytes run in fewer,
/// longer blocks. The most heads (4, 2) whose query heads fit the block's 16 rows and whose
/// blocks still fill the machine unsplit (`fills_machine`: more heads per block never buys a
/// split, whose partial rows and combine grow with the splits); one otherwise. Same-run A/B on
/// an H200 (bf16 decode, head dim 128, means of three processes; blocks of 1, 2, 4 heads):
/// 32/8 128 x 1024 (1024, 512, 256 blocks) x1.014 and x1.015 at 2 and 4 heads, 32/32 32 x 4096
/// (1024, 512, 256) x1.002 and x1.011, 32/32 128 x 1024 (4096, 2048, 1024) x1.004 and x0.984;
/// launches that grouping made split, or split more, lost up to a third (32/8 32 x 4096: 256,
/// 128, 64 blocks, x0.948 and x0.932; one 8192-key row in a 131072-key cache x0.67 at 4 heads),
/// one (32/32 1 x 131072) stayed within noise.
fn heads_per_block(
    requested: Option<i64>,
    decode_build: bool,
    geo: &Geometry,
    split: &SplitInput,
) -> Result<i64, Error> {
    let fits = |g: i64| decode_build && geo.hkv % g == 0 && g * geo.group <= 16;
    match requested {
        Some(1) => Ok(1),
        Some(g @ (2 | 4)) if fits(g) => Ok(g),
        Some(g) => Err(Error::Unsupported(format!(
            "{g} key/value heads per block with {} heads of {} query heads each (1; 2 or 4 \
             for the static cache's tensor-core decode, dividing the heads, at most 16 query \
             heads per block)",
            geo.hkv, geo.group
        ))),
        None => {
            let enough = enough_blocks(split);
            let good = |g: i64| fits(g) && fills_machine(split.units / g, split.slots, enough);
            Ok([4, 2].into_iter().find(|&g| good(g)).unwrap_or(1))
        }
    }
}

/// Whether `blocks` of the static decode build run better two to a multiprocessor than
/// `resident` (three): when more than one wave of two takes no more waves than three to a
/// multiprocessor, two fill their waves where three leave a thin last one. Measured on an
/// H200 (bf16, 132 multiprocessors): 32/8 with 1024 keys per row, 448, 480 and 528 blocks
/// (B = 56, 60, 66) ran 14, 8 and 5% faster two to a multiprocessor, with 4096 keys 448
/// blocks 9% and 400 1% faster, 32/32 512 blocks 2-6% faster and 416 blocks of 4096 keys 2%
/// slower; 792 and 1024 blocks (two and 2.6 waves of three) were 7 and 3-5% slower, 640
/// blocks of 4096 keys 4.5% slower; one wave either way made no difference.
fn two_resident_fill_better(blocks: i64, resident: i64, sms: i64) -> bool {
    let (two, three) = (2 * sms.max(1), 3 * sms.max(1));
    resident == 3 && blocks > two && (blocks + two - 1) / two == (blocks + three - 1) / three
}

/// A block's start, end and share of the split combine, in key tiles, as `wave_split` prices
/// them. Fitted on an H200 (bf16 32/8 decode, head dim 128, every split count timed): with 8,
/// a launch of more blocks than slots and a thin last wave stays whole for 1024-key rows
/// (B = 56, 60, 66: one split 5-10% faster than the 3 that 2 tiles chose; B = 80 at 4096
/// keys: 3% faster) and splits in three for 4096-key rows with a last wave of up to 84 blocks
/// (B = 50-60: 6-14% faster than one split).
const WAVE_SPLIT_OVERHEAD_TILES: i64 = 8;

/// Keys per block up to which the static launch runs a row's blocks side by side (`launch`).
const Z_FASTEST_MAX_KEYS: i64 = 2048;

/// Splits by wave cost: n splits take about waves(n) x (keys / n + `overhead`) key-times (a
/// last wave of a few blocks takes as long as a full one; `overhead` prices a block's
/// prologue, epilogue and share of the combine in keys); the fewest within 1% of the cheapest.
fn wave_split(units: i64, slots: i64, keys: i64, max_splits: i64, overhead: i64) -> i64 {
    let keys = keys.max(1);
    let cost = |n: i64| {
        let waves = (units * n + slots - 1) / slots;
        (waves * ((keys + n - 1) / n + overhead)) as f64
    };
    let candidates = 1..=max_splits.clamp(1, 4096);
    let best = candidates.clone().map(cost).fold(f64::INFINITY, f64::min);
    candidates.into_iter().find(|&n| cost(n) <= 1.01 * best).unwrap_or(1)
}

/// Runs the attention kernel (and the split combine) on libtorch's stream.
pub(crate) fn launch(
    paged: bool,
    path: KernelPath,
    kind: Kind,
    hd: i64,
    device: usize,
    mut p: Params,
    geo: Geometry,
) -> Result<(), Error> {
    let name = dtype_name(kind)?;
    let elt = kind.elt_size_in_bytes() as i64;
    let vec = 16 / elt;
    let threads = (WARPS * 32) as u32;
    // Head chunks of at most a block's pairs; tokens per tile fill the remaining pairs.
    let tiling = |max_pairs: i64| {
        let heads_per_chunk = geo.group.min(max_pairs);
        let tokens_per_tile = (max_pairs / heads_per_chunk).max(1).min(geo.max_q.max(1));
        (heads_per_chunk, tokens_per_tile)
    };
    let (variant, max_pairs, kt, smem) = if use_tensor_cores(paged, path, kind, hd, &geo)? {
        // Two stages of keys and values (the merge reuses them), one row tile of queries, then
        // the static cache's fp32 new key and rotary angles.
        // Key/value rows of at least 8 16-byte chunks are swizzled, narrower ones padded
        // (`Rows`); the decode build's own query rows are padded.
        let row = if hd / vec >= 8 { hd } else { hd + vec };
        let stages = 4 * MMA_KT * row * elt;
        let merge = (MMA_ROWS * (hd + 4) + 2 * MMA_ROWS) * 4;
        let smem = stages.max(merge) + 16 * (hd + vec) * elt + 2 * hd * 4;
        // Blocks of at most 16 pairs (decode) get the one-row-tile build.
        let (h, t) = tiling(MMA_ROWS);
        let rows = if h * t <= 16 { 16 } else { MMA_ROWS };
        let variant = Variant { dtype: name, head_dim: hd, tile: Tile::TensorCores { rows } };
        (variant, MMA_ROWS, MMA_KT, smem)
    } else {
        let (h, t) = tiling(MAX_PAIRS);
        let pairs = ((t * h) as u64).next_power_of_two() as i64;
        let kt = key_tile(hd, elt);
        // Rows are swizzled where each warp takes at least 8 keys of a tile and a row holds at
        // least 8 16-byte chunks, padded otherwise (`Rows`).
        let row = if kt / WARPS >= 8 && hd / vec >= 8 { hd } else { hd + vec };
        // Two stages of keys and values (the warp merge reuses them), the queries, the new key.
        let front = (4 * kt * row * elt).max(WARPS * pairs * (hd + 2) * 4);
        let smem = front + pairs * hd * 4 + hd * 4;
        (
            Variant { dtype: name, head_dim: hd, tile: Tile::CudaCores { pairs } },
            MAX_PAIRS,
            kt,
            smem,
        )
    };
    let (heads_per_chunk, tokens_per_tile) = tiling(max_pairs);
    let nchunks = (geo.group + heads_per_chunk - 1) / heads_per_chunk;
    let tiles = (geo.max_q + tokens_per_tile - 1) / tokens_per_tile;
    let k = kernels(device, variant)?;
    let one_head = variant.attend_name(paged);
    let loaded = k.function(&one_head, threads, smem as u32)?;
    // Split-KV (`split_count`), in splits of at least MIN_SPLIT_KEYS keys.
    let work_tiles = if paged {
        (geo.total_tokens + tokens_per_tile - 1) / tokens_per_tile
    } else {
        geo.n_rows * tiles
    };
    let units = work_tiles.max(geo.n_rows) * geo.hkv * nchunks;
    let stage_bytes = 2 * kt * hd * elt;
    // Key/value heads per block (`heads_per_block`: the static decode build only). A block of
    // gpb heads holds their new keys in fp32 and kt / gpb positions of each per stage.
    let static_decode = !paged && variant.tile == (Tile::TensorCores { rows: 16 });
    let decode_build = static_decode && nchunks == 1;
    let probe = SplitInput {
        units,
        sms: k.sm_count,
        slots: loaded.resident * k.sm_count,
        stage_bytes,
        keys: geo.max_keys,
        kt,
        max_splits: 1,
        gathered: false,
    };
    let gpb = heads_per_block(geo.heads_per_block, decode_build, &geo, &probe)?;
    let (kt, mut smem, mut attend, attend_name) = if gpb == 1 {
        (kt, smem as u32, loaded, one_head)
    } else {
        let name = format!("{one_head}g{gpb}");
        let smem = (smem + (gpb - 1) * hd * 4) as u32;
        (kt / gpb, smem, k.function(&name, threads, smem)?, name)
    };
    let hkv_blocks = geo.hkv / gpb;
    let blocks = units / gpb;
    if static_decode && two_resident_fill_better(blocks, attend.resident, k.sm_count) {
        // Shared memory padded so that two blocks fit instead of three (never below what the
        // build needs: three resident blocks already imply it is under a third of the limit).
        let padded = ((k.smem_optin + 1024) / 3 + 128).max(smem);
        let two = k.function(&attend_name, threads, padded)?;
        if two.resident == 2 {
            (attend, smem) = (two, padded);
        }
    }
    let stream = k.torch_stream(device)?;
    let keys = if geo.max_keys < geo.capacity && stream_capturing(&stream)? {
        geo.capacity
    } else {
        geo.max_keys
    };
    let max_splits = ((keys + MIN_SPLIT_KEYS - 1) / MIN_SPLIT_KEYS).max(1);
    let slots = attend.resident * k.sm_count;
    let nsplit = split_count(SplitInput {
        units: blocks,
        sms: k.sm_count,
        slots,
        stage_bytes,
        keys,
        kt,
        max_splits,
        gathered: paged && i64::from(p.block_size) < kt,
    });
    // The least keys per split: the longest row the host expects over the splits, in whole
    // tiles. The kernels spread a longer row over every split (`split_length`), so a launch
    // captured with the cache's capacity of splits stays balanced at any replayed length.
    let per_split = (geo.max_keys + nsplit - 1) / nsplit;
    let split_len = ((per_split + kt - 1) / kt * kt).max(kt);
    let nsplit = nsplit.min((keys + split_len - 1) / split_len).max(1);
    p.n_rows = geo.n_rows as i32;
    p.hkv = geo.hkv as i32;
    p.group = geo.group as i32;
    p.hq = (geo.hkv * geo.group) as i32;
    p.heads_per_chunk = heads_per_chunk as i32;
    p.nchunks = nchunks as i32;
    p.tokens_per_tile = tokens_per_tile as i32;
    p.nsplit = nsplit as i32;
    p.split_len = split_len as i32;
    p.total_tokens = geo.total_tokens as i32;
    let dev = Device::Cuda(device);
    // The splits' partial outputs, then their log-sum-exps, in one allocation: one libtorch
    // allocation fewer per step (x1.05 on a host-bound 12-microsecond decode step, H200).
    let partials = if nsplit > 1 {
        let rows = nsplit * geo.total_tokens * geo.hkv * geo.group;
        let t = Tensor::f_empty([rows * (hd + 1)], (Kind::Float, dev))?;
        p.part_o = t.data_ptr() as u64;
        p.part_lse = p.part_o + (rows * hd * 4) as u64;
        Some(t)
    } else {
        None
    };
    let z = hkv_blocks * nchunks * nsplit;
    // The paged kernels enumerate every request's token tiles along x (`block_tile`): row r's
    // start at (cu_q[r] + r (T - 1)) / T, the end of the last row at the same for r = n_rows.
    let (gx, gy) = if paged {
        ((geo.total_tokens + geo.n_rows * (tokens_per_tile - 1)) / tokens_per_tile, 1)
    } else {
        (tiles, geo.n_rows)
    };
    // Static cache: a row's (group, chunk, split) blocks side by side (grid (z, rows, tiles),
    // `block_tile`) where each holds few keys, rows side by side (grid (tiles, rows, z))
    // otherwise. Same-run A/B (bf16 decode, head dim 128): z fastest ran 0.7-2.5% faster with
    // 1024 keys per block (32/8 and 32/32, 128 rows) on two H100s and three of four H200s
    // (unchanged on the fourth); with 4096 it ran 0.7% faster on an H100 but 1-2% slower on
    // two H200s (32/32, 32 rows). Blocks of 2048 keys were not measured.
    let z_fastest = !paged && split_len <= Z_FASTEST_MAX_KEYS;
    p.z_fastest = i32::from(z_fastest);
    // The paged kernels renumber their blocks with an int: gx x z must fit.
    let grid = if z_fastest { (z, gy, gx) } else { (gx, gy, z) };
    if grid.1 > 65535 || grid.2 > 65535 || gx * z > i32::MAX as i64 {
        return Err(Error::Unsupported(format!(
            "launch of {gx} x {gy} x {z} (group, chunk, split) blocks"
        )));
    }
    let cfg = LaunchConfig {
        grid_dim: (grid.0 as u32, grid.1 as u32, grid.2 as u32),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: smem,
    };
    #[expect(unsafe_code, reason = "kernel launch on raw libtorch pointers")]
    // SAFETY: the callers checked every pointer's tensor (dtype, device, contiguity, shape) and
    // keep the tensors alive until the work is queued on libtorch's stream, whose allocator
    // orders reuse after it.
    unsafe {
        queue(&stream, &attend.func, cfg, &p, false)?;
    }
    if nsplit > 1 {
        // The kernels' COMBINE_THREADS; shared memory: the split weights (room for a power of
        // two of them, so few sizes are ever loaded), then one row of partial sums per group.
        let threads = 128u32;
        let groups = i64::from(threads) / (hd / 4);
        let room = (nsplit as u64).next_power_of_two().max(64) as i64;
        let smem = ((room + groups * hd) * 4) as u32;
        let combine = k.function(&format!("attn_combine_{name}_{hd}"), threads, smem)?;
        let cfg = LaunchConfig {
            grid_dim: (geo.total_tokens as u32, (geo.hkv * geo.group) as u32, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: smem,
        };
        // The combine alone launches programmatically (`queue` says why).
        let programmatic = geo.programmatic && k.programmatic;
        #[expect(unsafe_code, reason = "kernel launch on raw libtorch pointers")]
        // SAFETY: as above; the partials live until the end of this function, after the launch
        // was queued on the same stream.
        unsafe {
            queue(&stream, &combine.func, cfg, &p, programmatic)?;
        }
    }
    drop(partials);
    Ok(())
}

/// The dtype's name and a kernel module for the entries every build holds (the append, the
/// merge): the one the paged steps of this dtype and head dimension load anyway.
fn every_build(kind: Kind, hd: i64, device: usize) -> Result<(&'static str, Arc<Kernels>), Error> {
    let dtype = dtype_name(kind)?;
    let tile = if tensor_cores_apply(kind, hd) {
        Tile::TensorCores { rows: MMA_ROWS }
    } else {
        Tile::CudaCores { pairs: 1 }
    };
    Ok((dtype, kernels(device, Variant { dtype, head_dim: hd, tile })?))
}

/// Whether libtorch's current stream on `device` is capturing a CUDA graph (through the module
/// the paged steps of this dtype and head dimension load anyway).
pub(crate) fn capturing(kind: Kind, hd: i64, device: usize) -> Result<bool, Error> {
    let (_, k) = every_build(kind, hd, device)?;
    stream_capturing(&*k.torch_stream(device)?)
}

/// Whether `stream` is capturing a CUDA graph.
fn stream_capturing(stream: &CudaStream) -> Result<bool, Error> {
    let status = stream
        .capture_status()
        .map_err(|e| Error::Driver(format!("stream capture status: {e:?}")))?;
    Ok(status != cudarc::driver::sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
}

/// Appends a paged step's new keys and values (`p.k_new`, `p.v_new`: rows of `hkv` heads) of
/// tokens `p.token0..p.token0 + total_tokens` to their slots, as the attention kernels do,
/// without attending (`attn_append_*`: one block a token). `p.cu_q`, `p.kv_len` and
/// `p.block_table` start at the launch's first request (`n_rows` of them); `cu_q`'s offsets,
/// like the rows, count from the step's first token. The callers attend with another kernel.
pub(crate) fn append(
    kind: Kind,
    hd: i64,
    device: usize,
    mut p: Params,
    (n_rows, hkv, total_tokens): (i64, i64, i64),
) -> Result<(), Error> {
    let (dtype, k) = every_build(kind, hd, device)?;
    let threads = (WARPS * 32) as u32;
    let f = k.function(&format!("attn_append_{dtype}_{hd}"), threads, 0)?;
    let grid = u32::try_from(total_tokens)
        .map_err(|_| Error::Unsupported(format!("an append of {total_tokens} tokens")))?;
    p.n_rows = n_rows as i32;
    p.hkv = hkv as i32;
    p.total_tokens = total_tokens as i32;
    let cfg =
        LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
    let stream = k.torch_stream(device)?;
    #[expect(unsafe_code, reason = "kernel launch on raw libtorch pointers")]
    // SAFETY: the caller checked every pointer's tensor (dtype, device, contiguity, shape) and
    // keeps the tensors alive until the work is queued on libtorch's stream.
    unsafe {
        queue(&stream, &f.func, cfg, &p, false)
    }
}

/// Merges two attentions of the same queries over disjoint keys into `p.out` (see
/// [`MergeParams`]); the caller checked the layouts (16-byte aligned rows, heads `hd` apart).
pub(crate) fn merge(kind: Kind, hd: i64, device: usize, p: MergeParams) -> Result<(), Error> {
    let (dtype, k) = every_build(kind, hd, device)?;
    let threads = 256u32;
    let f = k.function(&format!("attn_merge_{dtype}_{hd}"), threads, 0)?;
    let lanes =
        i64::from(p.tokens) * i64::from(p.heads) * hd * kind.elt_size_in_bytes() as i64 / 16;
    // Grid-stride: a few waves of blocks at most.
    let blocks = ((lanes + i64::from(threads) - 1) / i64::from(threads)).clamp(1, 64 * k.sm_count);
    let cfg = LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    let stream = k.torch_stream(device)?;
    #[expect(unsafe_code, reason = "kernel launch on raw libtorch pointers")]
    // SAFETY: the caller checked every pointer's tensor (dtype, device, layout, shape) and keeps
    // the tensors alive until the work is queued on libtorch's stream.
    unsafe {
        queue(&stream, &f.func, cfg, &p, false)
    }
}

/// Queues `func(p)` on `stream`. With `programmatic`, as a programmatic dependent launch: the
/// grid may be scheduled once the previous kernel on the stream lets it (the kernels here do
/// once done streaming, `launch_next_grid`; others when their blocks exit), and its blocks
/// wait for that kernel to complete before they touch memory (`wait_for_previous_grid`).
///
/// `launch` uses it for the split combine only. Same-process A/B on an H200 (bf16 decode, head
/// dim 128): the attention kernel launched that way too gained up to 2%, but wherever its
/// blocks became resident in the slots the previous grid had left free, spread unevenly over
/// the multiprocessors, it lost far more: one-wave launches of 256 blocks (32/8 at 32 x 4096
/// and 128 x 1024, 32/32 at 8 x 16384 and 32 x 4096) 22-25% of their bandwidth when the
/// kernels let the next one launch at their start, the launches after a combine (1 x 131072
/// and 8 x 16384, static and paged) 2-19% when they let it after their key loop. The combine
/// alone launched that way: split launches up to 1.5% faster (H100 and H200), others
/// unchanged.
///
/// # Safety
/// `p` must hold pointers to live device memory of the sizes the kernel reads and writes,
/// valid until the work has run on `stream` (libtorch's allocator orders reuse after it).
#[expect(unsafe_code, reason = "raw driver launch")]
unsafe fn queue<P: DeviceRepr>(
    stream: &CudaStream,
    func: &CudaFunction,
    cfg: LaunchConfig,
    p: &P,
    programmatic: bool,
) -> Result<(), Error> {
    let driver = |e| Error::Driver(format!("{e:?}"));
    if !programmatic {
        let mut b = stream.launch_builder(func);
        b.arg(p);
        // SAFETY: the caller's.
        return unsafe { b.launch(cfg) }.map(drop).map_err(driver);
    }
    stream.context().bind_to_thread().map_err(driver)?;
    let mut attr = sys::CUlaunchAttribute {
        id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
        pad: [0; 4],
        value: sys::CUlaunchAttributeValue { programmaticStreamSerializationAllowed: 1 },
    };
    let config = sys::CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: stream.cu_stream(),
        attrs: &mut attr,
        numAttrs: 1,
    };
    let mut args = [std::ptr::from_ref(p).cast_mut().cast::<std::ffi::c_void>()];
    // SAFETY: one attribute, which outlives the call; `args` holds the address of the kernel's
    // one parameter, of its exact layout; the pointers in it are the caller's.
    unsafe {
        sys::cuLaunchKernelEx(&config, func.cu_function(), args.as_mut_ptr(), std::ptr::null_mut())
    }
    .result()
    .map_err(driver)
}

#[cfg(test)]
mod tests {
    use super::{SplitInput, scale_log2, split_count};

    #[test]
    fn softmax_scale_must_be_positive_and_finite() {
        assert_eq!(scale_log2(1.0).ok(), Some(std::f64::consts::LOG2_E as f32));
        for bad in [0.0, -0.125, f64::NAN, f64::INFINITY, 1e-300] {
            let err = scale_log2(bad).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains("softmax scale"), "{bad}: {err:?}");
        }
    }

    #[test]
    fn two_resident_blocks_only_where_they_fill_the_waves() {
        use super::two_resident_fill_better as two;
        // 132 multiprocessors: up to 264 blocks fit one wave either way, up to 396 one wave of
        // three (two of two); 397 to 528 take two waves either way; more take fewer waves of
        // three.
        for (blocks, want) in
            [(200, false), (300, false), (400, true), (448, true), (528, true), (529, false)]
        {
            assert_eq!(two(blocks, 3, 132), want, "{blocks} blocks");
        }
        for blocks in [640, 792, 1024, 4096] {
            assert!(!two(blocks, 3, 132), "{blocks} blocks");
        }
        assert!(!two(448, 2, 132), "already two");
    }

    #[test]
    fn blocks_take_several_heads_only_where_they_still_fill_the_gpu() {
        use super::{Geometry, heads_per_block};
        // 132 multiprocessors, 3 blocks each; one block per (row, head) before grouping.
        let pick = |rows: i64, hkv: i64, group: i64, requested: Option<i64>, decode: bool| {
            let geo = Geometry {
                n_rows: rows,
                max_q: 1,
                hkv,
                group,
                max_keys: 1024,
                capacity: 1024,
                total_tokens: rows,
                heads_per_block: requested,
                programmatic: true,
            };
            let split = SplitInput {
                units: rows * hkv,
                sms: 132,
                slots: 396,
                stage_bytes: super::REFERENCE_STAGE_BYTES,
                keys: 1024,
                kt: 64,
                max_splits: 1,
                gathered: false,
            };
            heads_per_block(requested, decode, &geo, &split).ok()
        };
        // 1024 blocks (2.6 waves) become 256 of 4 heads (one wave, about two per multiprocessor).
        assert_eq!(pick(128, 8, 4, None, true), Some(4));
        assert_eq!(pick(32, 32, 1, None, true), Some(4));
        // 4096 blocks: 4 heads would leave 1024 (a thin last wave), 2 leave 2048 (5.2 waves).
        assert_eq!(pick(128, 32, 1, None, true), Some(2));
        // Grouping would make a launch split: one head.
        assert_eq!(pick(32, 8, 4, None, true), Some(1));
        assert_eq!(pick(8, 8, 4, None, true), Some(1));
        // 8 query heads per group: 2 heads per block at most (16 rows).
        assert_eq!(pick(512, 8, 8, None, true), Some(2));
        // Not the static decode build: one head.
        assert_eq!(pick(128, 8, 4, None, false), Some(1));
        // Forced: what fits, an error otherwise.
        assert_eq!(pick(1, 8, 4, Some(4), true), Some(4));
        assert_eq!(pick(1, 8, 4, Some(1), false), Some(1));
        assert_eq!(pick(1, 2, 4, Some(4), true), None, "4 heads of 2");
        assert_eq!(pick(1, 8, 8, Some(4), true), None, "32 query heads in 16 rows");
        assert_eq!(pick(1, 8, 4, Some(2), false), None, "not the decode build");
        assert_eq!(pick(1, 8, 4, Some(3), true), None, "3 heads");
    }

    #[test]
    fn splits_give_enough_blocks_in_flight() {
        let stage = super::REFERENCE_STAGE_BYTES;
        // 132 multiprocessors, 3 blocks of 32 KB stages each (251 blocks are enough).
        let h200 = |units, keys, max_splits| {
            split_count(SplitInput {
                units,
                sms: 132,
                slots: 396,
                stage_bytes: stage,
                keys,
                kt: 64,
                max_splits,
                gathered: false,
            })
        };
        // 8 key/value heads of one request: 33 splits (264 blocks, two per multiprocessor);
        // 64 units: 4; 96 units: 4 (384 blocks, three on most multiprocessors, rather than
        // 288 with three on only some); 256: none.
        assert_eq!(h200(8, 131072, 512), 33);
        assert_eq!(h200(96, 4096, 16), 4);
        assert_eq!(h200(64, 16384, 64), 4);
        assert_eq!(h200(256, 4096, 16), 1);
        // 200 units: two splits would start a second wave of 4 blocks.
        assert_eq!(h200(200, 4096, 16), 1);
        // A thin last wave (1024 blocks, 232 in the third wave): the wave cost decides, and
        // keeps short keys whole.
        assert_eq!(h200(1024, 1024, 4), 1);
        // A thin last wave: 1024-key rows stay whole (B = 66 x 8 heads), 4096-key rows split
        // in three (B = 52 x 8).
        assert_eq!(h200(528, 1024, 4), 1);
        assert_eq!(h200(416, 4096, 16), 3);
        // Many waves, or a last wave of enough blocks: no split.
        assert_eq!(h200(4096, 1024, 4), 1);
        assert_eq!(h200(396 + 260, 4096, 16), 1);
        assert_eq!(h200(8, 1024, 4), 4, "at most max_splits");
        // Half-size stages want twice the blocks; gathered pages half as many again.
        let small = |units, slots, keys, gathered| {
            split_count(SplitInput {
                units,
                sms: 132,
                slots,
                stage_bytes: stage / 2,
                keys,
                kt: 32,
                max_splits: keys / 256,
                gathered,
            })
        };
        assert_eq!(small(32, 792, 131072, false), 16);
        assert_eq!(small(32, 792, 131072, true), 24);
        // 1024 blocks in 1.3 waves of 792: the wave cost splits them in three (3.9 waves).
        assert_eq!(small(1024, 792, 4096, false), 3);
        // Degenerate inputs stay at one split.
        let none = SplitInput {
            units: 0,
            sms: 0,
            slots: 0,
            stage_bytes: 0,
            keys: 0,
            kt: 0,
            max_splits: 0,
            gathered: false,
        };
        assert_eq!(split_count(none), 1);
    }
}
