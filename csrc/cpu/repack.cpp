// Load-time repacking of canonical packed weights into the CPU panel layouts, and the cache that holds them.
//
// The canonical format (src/quantkit/formats/spec.py) is the only thing ever written to disk. Kernels need the
// codes transposed into panels of kNR output columns (and, for convolutions, K reordered tap-major); a repacked
// weight is one uint8 "blob" tensor (layout in internal.h). Ops get it in one of two ways:
//   * qdata is the blob itself: a compacted module (quantkit.ops.native.compact) holds the blob in place of the
//     canonical codes, so the weight is in memory once; `blob_to_canonical` gives the canonical codes back
//     (state_dict, export, moving to another device);
//   * qdata is canonical: the blob comes from a cache that
//       - keys on the identity of the qdata / w_scale / w_zero_point storages (StorageImpl pointers, offsets,
//         shapes) plus the layout; it holds weak references to those storages, so an address cannot be reused by
//         another tensor while its entry exists, and entries of freed tensors are swept on the next insertion;
//       - validates the tensors' version counters on every hit: an in-place write (copy_, load_state_dict) makes
//         the next call repack. Writes that bypass the version counter (through `.data`, numpy views, or on
//         inference tensors, which have no version counter) are not seen: call quantkit.ops.native.clear_cache();
//       - is bounded: least recently used entries are evicted beyond QUANTKIT_REPACK_CACHE_MB (default 8192 MiB).
//     The repacked weight is the same size as the canonical one (plus per-group int32 sums), so the default
//     holds a full SDXL UNet, at the price of a second copy of every weight.
#include <ATen/Parallel.h>
#include <c10/core/StorageImpl.h>
#include <c10/util/intrusive_ptr.h>

#include <cstdlib>
#include <cstring>
#include <list>
#include <mutex>
#include <tuple>
#include <unordered_map>

#include "internal.h"
#include "quantkit/format.h"

namespace quantkit {
namespace cpu {

at::Tensor scale_f32(const at::Tensor& w_scale, int64_t n) {
  TORCH_CHECK(w_scale.dim() == 2, "quantkit: w_scale must be 2-D [out_features, groups], got shape ",
              w_scale.sizes());
  TORCH_CHECK(w_scale.size(0) == n || w_scale.size(0) == 1, "quantkit: w_scale has ", w_scale.size(0),
              " rows for ", n, " output features");
  TORCH_CHECK(at::isFloatingType(w_scale.scalar_type()), "quantkit: w_scale must be floating point, got ",
              w_scale.scalar_type());
  return w_scale.to(at::kFloat).expand({n, w_scale.size(1)}).contiguous();
}

at::Tensor zero_point_i32(const std::optional<at::Tensor>& w_zero_point, const at::Tensor& scale, int64_t w_bits) {
  if (!w_zero_point.has_value()) {
    return at::full(scale.sizes(), format::symmetric_zero_point(static_cast<int>(w_bits)),
                    scale.options().dtype(at::kInt));
  }
  const at::Tensor& zp = *w_zero_point;
  TORCH_CHECK(!at::isComplexType(zp.scalar_type()), "quantkit: w_zero_point must be real");
  // The reference converts through float64; zero points are small integers, so int32 is exact.
  return zp.to(at::kInt).expand(scale.sizes()).contiguous();
}

namespace {

// ---- layout -----------------------------------------------------------------------------------------------------

// Logical padded order of K (see cpu_kernels.h). Convolution groups that cover whole taps are ordered
// tap-major (c fastest) so that the activation gather copies runs of channels from NHWC codes.
void build_kmap(int layout_bits, KOrder order, int64_t conv_kh, int64_t conv_kw, int64_t groups, int64_t group_len,
                std::vector<int64_t>& seg_off, std::vector<int32_t>& kmap) {
  const int align = layout_bits == 4 ? 8 : 4;
  const int64_t taps = order == KOrder::kConv ? conv_kh * conv_kw : 1;
  const bool tap_major = taps > 1 && group_len % taps == 0;
  seg_off.assign(groups + 1, 0);
  kmap.clear();
  for (int64_t g = 0; g < groups; ++g) {
    seg_off[g] = static_cast<int64_t>(kmap.size());
    const int64_t base = g * group_len;
    if (tap_major) {
      const int64_t cg = group_len / taps;
      for (int64_t t = 0; t < taps; ++t)
        for (int64_t cc = 0; cc < cg; ++cc) kmap.push_back(static_cast<int32_t>(base + cc * taps + t));
    } else {
      for (int64_t j = 0; j < group_len; ++j) kmap.push_back(static_cast<int32_t>(base + j));
    }
    while (kmap.size() % align) kmap.push_back(-1);
  }
  seg_off[groups] = static_cast<int64_t>(kmap.size());
}

// ---- blob ---------------------------------------------------------------------------------------------------------

constexpr uint32_t kBlobMagic = 0x57504b51u;  // "QKPW"
constexpr uint32_t kBlobVersion = 1;
constexpr int64_t kBlobHeaderBytes = 256;

struct BlobHeader {
  uint32_t magic, version;
  int32_t w_bits, layout_bits, order, reserved;
  int64_t n, k, groups, conv_c, conv_kh, conv_kw, kp, npanels, panel_bytes, max_abs_wc;
  int64_t off_seg, off_kmap, off_wzp, off_swc, off_scale, off_b, total;
};
static_assert(sizeof(BlobHeader) <= kBlobHeaderBytes, "blob header too large");

int64_t align64(int64_t v) { return (v + 63) / 64 * 64; }

// Fill pw's fields and view from a blob whose header is valid.
std::shared_ptr<PackedWeight> view_blob(const at::Tensor& blob) {
  const uint8_t* base = blob.data_ptr<uint8_t>();
  BlobHeader h;
  std::memcpy(&h, base, sizeof(h));
  auto pw = std::make_shared<PackedWeight>();
  pw->blob = blob;
  pw->w_bits = h.w_bits;
  pw->layout_bits = h.layout_bits;
  pw->k = h.k;
  pw->groups = h.groups;
  pw->group_len = h.k / h.groups;
  pw->order = static_cast<KOrder>(h.order);
  pw->conv_c = h.conv_c;
  pw->conv_kh = h.conv_kh;
  pw->conv_kw = h.conv_kw;
  pw->seg_off = reinterpret_cast<const int64_t*>(base + h.off_seg);
  pw->kmap = reinterpret_cast<const int32_t*>(base + h.off_kmap);
  pw->max_abs_wc = h.max_abs_wc;
  PanelWeight& v = pw->view;
  v.w_bits = h.layout_bits;
  v.n = h.n;
  v.npanels = h.npanels;
  v.nseg = static_cast<int>(h.groups);
  v.kp = h.kp;
  v.seg_off = pw->seg_off;
  v.b = base + h.off_b;
  v.panel_bytes = h.panel_bytes;
  v.wzp = reinterpret_cast<const int32_t*>(base + h.off_wzp);
  v.swc = reinterpret_cast<const int32_t*>(base + h.off_swc);
  v.scale = reinterpret_cast<const float*>(base + h.off_scale);
  return pw;
}

// Position i of a nibble block is stored in nibble kSlot[i] (inverse of nib_pos).
constexpr int kSlot[8] = {0, 2, 4, 6, 1, 3, 5, 7};

// Byte offset of position p, column nn in a byte panel (W8 k-pairs, W8Q k-quads).
inline int64_t byte_index(int layout_bits, int nn, int64_t p) {
  return layout_bits == 7 ? (p >> 2) * 4 * kNR + nn * 4 + (p & 3) : (p >> 1) * 2 * kNR + nn * 2 + (p & 1);
}

// W8Q stores code - 128 and zero point - 128 (see cpu_kernels.h); everything else the codes and zero points.
inline int stored_offset(int layout_bits) { return layout_bits == 7 ? 128 : 0; }

inline int panel_code(const PanelWeight& v, int layout_bits, int64_t panel, int nn, int64_t p) {
  const uint8_t* pb = v.b + panel * v.panel_bytes;
  if (layout_bits == 8) return pb[byte_index(8, nn, p)];
  if (layout_bits == 7) return static_cast<int8_t>(pb[byte_index(7, nn, p)]) + 128;
  const uint32_t word = reinterpret_cast<const uint32_t*>(pb)[(p >> 3) * kNR + nn];
  return static_cast<int>((word >> (4 * kSlot[p & 7])) & 15u);
}

std::shared_ptr<PackedWeight> repack(const at::Tensor& qdata, const at::Tensor& w_scale,
                                     const std::optional<at::Tensor>& w_zero_point, int w_bits, int layout_bits,
                                     int64_t k, KOrder order, int64_t conv_c, int64_t conv_kh, int64_t conv_kw) {
  const int64_t n = qdata.size(0);
  const int64_t groups = w_scale.size(1);
  TORCH_CHECK(groups >= 1 && k % groups == 0, "quantkit: ", groups, " weight groups do not divide in_features ", k);
  TORCH_CHECK(n >= 1, "quantkit: a weight needs at least one output feature");
  const int64_t group_len = k / groups;
  std::vector<int64_t> seg_vec;
  std::vector<int32_t> kmap_vec;
  build_kmap(layout_bits, order, conv_kh, conv_kw, groups, group_len, seg_vec, kmap_vec);

  const at::Tensor q = qdata.contiguous();
  const at::Tensor sc = scale_f32(w_scale, n);
  const at::Tensor zp = zero_point_i32(w_zero_point, sc, w_bits);
  const int64_t words = q.size(1);
  const int64_t npanels = (n + kNR - 1) / kNR;
  const int64_t kp = static_cast<int64_t>(kmap_vec.size());
  const int64_t nseg = groups;
  const int64_t panel_bytes = layout_bits == 4 ? kp / 2 * kNR : kp * kNR;
  TORCH_CHECK(layout_bits == 4 || layout_bits == 8 || (layout_bits == 7 && w_bits == 8),
              "quantkit: bad CPU layout ", layout_bits, " for ", w_bits, "-bit weights");
  const int off = stored_offset(layout_bits);

  BlobHeader h{};
  h.magic = kBlobMagic;
  h.version = kBlobVersion;
  h.w_bits = w_bits;
  h.layout_bits = layout_bits;
  h.order = static_cast<int32_t>(order);
  h.n = n;
  h.k = k;
  h.groups = groups;
  h.conv_c = conv_c;
  h.conv_kh = conv_kh;
  h.conv_kw = conv_kw;
  h.kp = kp;
  h.npanels = npanels;
  h.panel_bytes = panel_bytes;
  const int64_t per_seg = npanels * nseg * kNR * 4;
  h.off_seg = kBlobHeaderBytes;
  h.off_kmap = align64(h.off_seg + (groups + 1) * 8);
  h.off_wzp = align64(h.off_kmap + kp * 4);
  h.off_swc = align64(h.off_wzp + per_seg);
  h.off_scale = align64(h.off_swc + per_seg);
  h.off_b = align64(h.off_scale + per_seg);
  h.total = h.off_b + npanels * panel_bytes;
  const int64_t cols = (h.total + n - 1) / n;
  at::Tensor blob = at::zeros({n, cols}, at::TensorOptions().device(at::kCPU).dtype(at::kByte));
  uint8_t* base = blob.data_ptr<uint8_t>();
  std::memcpy(base + h.off_seg, seg_vec.data(), seg_vec.size() * sizeof(int64_t));
  std::memcpy(base + h.off_kmap, kmap_vec.data(), kmap_vec.size() * sizeof(int32_t));

  const int32_t* qp = q.data_ptr<int32_t>();
  const float* scp = sc.data_ptr<float>();
  const int32_t* zpp = zp.data_ptr<int32_t>();
  uint8_t* bp = base + h.off_b;
  int32_t* wzpp = reinterpret_cast<int32_t*>(base + h.off_wzp);
  int32_t* swcp = reinterpret_cast<int32_t*>(base + h.off_swc);
  float* spp = reinterpret_cast<float*>(base + h.off_scale);
  const int32_t* kmap = kmap_vec.data();
  const int64_t* seg_off = seg_vec.data();
  std::vector<int64_t> max_abs(static_cast<size_t>(npanels), 0);

  at::parallel_for(0, npanels, 1, [&](int64_t p0, int64_t p1) {
    std::vector<uint8_t> codes(static_cast<size_t>(k));
    for (int64_t panel = p0; panel < p1; ++panel) {
      uint8_t* pb = bp + panel * panel_bytes;
      int64_t mx = 0;
      for (int nn = 0; nn < kNR; ++nn) {
        const int64_t row = panel * kNR + nn;
        if (row >= n) break;
        const int32_t* qr = qp + row * words;
        for (int64_t kk = 0; kk < k; ++kk) codes[kk] = format::unpack_code(qr, kk, w_bits);
        for (int64_t g = 0; g < nseg; ++g) {
          const int32_t z = zpp[row * nseg + g];
          const int64_t pi = (panel * nseg + g) * kNR + nn;
          wzpp[pi] = z - off;
          spp[pi] = scp[row * nseg + g];
          int64_t sum = 0;
          for (int64_t p = seg_off[g]; p < seg_off[g + 1]; ++p) {
            const int32_t src = kmap[p];
            if (src < 0) continue;  // padding: code 0, excluded from the sums
            const int c = codes[src];
            sum += c - z;
            const int64_t d = c - z < 0 ? z - c : c - z;
            mx = d > mx ? d : mx;
            if (layout_bits != 4) {
              pb[byte_index(layout_bits, nn, p)] = static_cast<uint8_t>(c - off);
            } else {
              uint32_t* word = reinterpret_cast<uint32_t*>(pb) + (p >> 3) * kNR + nn;
              *word |= static_cast<uint32_t>(c) << (4 * kSlot[p & 7]);
            }
          }
          TORCH_CHECK(sum >= INT32_MIN && sum <= INT32_MAX, "quantkit: weight group sum overflows int32");
          swcp[pi] = static_cast<int32_t>(sum);
        }
      }
      max_abs[static_cast<size_t>(panel)] = mx;
    }
  });
  for (int64_t v : max_abs) h.max_abs_wc = v > h.max_abs_wc ? v : h.max_abs_wc;
  std::memcpy(base, &h, sizeof(h));
  return view_blob(blob);
}

}  // namespace

bool is_blob(const at::Tensor& qdata) { return qdata.scalar_type() == at::kByte; }

std::shared_ptr<const PackedWeight> from_blob(const at::Tensor& blob) {
  TORCH_CHECK(blob.scalar_type() == at::kByte && blob.device().is_cpu() && blob.is_contiguous() &&
                  blob.nbytes() >= static_cast<size_t>(kBlobHeaderBytes),
              "quantkit: uint8 weight_packed is not a CPU-kernel-layout weight (expected the contiguous CPU uint8 "
              "tensor made by quantkit.ops.native.compact)");
  BlobHeader h;
  std::memcpy(&h, blob.data_ptr<uint8_t>(), sizeof(h));
  TORCH_CHECK(h.magic == kBlobMagic && h.version == kBlobVersion,
              "quantkit: uint8 weight_packed is not a CPU-kernel-layout weight of this quantkit version (bad header)");
  TORCH_CHECK(h.total <= static_cast<int64_t>(blob.nbytes()), "quantkit: truncated CPU-kernel-layout weight");
  return view_blob(blob);
}

at::Tensor blob_to_canonical(const at::Tensor& blob) {
  auto pw = from_blob(blob);
  const int bits = pw->w_bits;
  const int64_t n = pw->view.n, k = pw->k;
  const int vpw = format::values_per_word(bits);
  const int64_t words = (k + vpw - 1) / vpw;
  at::Tensor q = at::zeros({n, words}, at::TensorOptions().dtype(at::kInt));
  uint32_t* qp = reinterpret_cast<uint32_t*>(q.data_ptr<int32_t>());
  const PanelWeight& v = pw->view;
  at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t panel = row / kNR;
      const int nn = static_cast<int>(row % kNR);
      uint32_t* qr = qp + row * words;
      for (int64_t p = 0; p < v.kp; ++p) {
        const int32_t kk = pw->kmap[p];
        if (kk < 0) continue;
        const uint32_t code = static_cast<uint32_t>(panel_code(v, pw->layout_bits, panel, nn, p));
        qr[kk / vpw] |= code << ((kk % vpw) * bits);
      }
    }
  });
  return q;
}

void dequantize_packed_rows(const PackedWeight& pw, int64_t n0, int64_t n1, float* out) {
  const PanelWeight& v = pw.view;
  const int64_t k = pw.k, nseg = pw.groups;
  for (int64_t row = n0; row < n1; ++row) {
    const int64_t panel = row / kNR;
    const int nn = static_cast<int>(row % kNR);
    float* o = out + (row - n0) * k;
    for (int64_t g = 0; g < nseg; ++g) {
      const int64_t pi = (panel * nseg + g) * kNR + nn;
      const int32_t z = v.wzp[pi] + stored_offset(pw.layout_bits);
      const float s = v.scale[pi];
      for (int64_t p = pw.seg_off[g]; p < pw.seg_off[g + 1]; ++p) {
        const int32_t kk = pw.kmap[p];
        if (kk < 0) continue;
        o[kk] = static_cast<float>(panel_code(v, pw.layout_bits, panel, nn, p) - z) * s;
      }
    }
  }
}

at::Tensor make_blob(const at::Tensor& qdata, const at::Tensor& w_scale, const std::optional<at::Tensor>& w_zero_point,
                     int64_t w_bits, int layout_bits, int64_t k, KOrder order, int64_t conv_c, int64_t conv_kh,
                     int64_t conv_kw) {
  return repack(qdata, w_scale, w_zero_point, static_cast<int>(w_bits), layout_bits, k, order, conv_c, conv_kh,
                conv_kw)
      ->blob;
}

namespace {

// ---- cache ------------------------------------------------------------------------------------------------------

using WeakStorage = c10::weak_intrusive_ptr<c10::StorageImpl>;

struct TensorId {
  const void* storage = nullptr;
  int64_t offset = 0;
  std::vector<int64_t> sizes, strides;
  int dtype = -1;
  bool operator==(const TensorId& o) const {
    return storage == o.storage && offset == o.offset && sizes == o.sizes && strides == o.strides &&
           dtype == o.dtype;
  }
};

TensorId tensor_id(const at::Tensor& t) {
  TensorId id;
  id.storage = t.storage().unsafeGetStorageImpl();
  id.offset = t.storage_offset();
  id.sizes = t.sizes().vec();
  id.strides = t.strides().vec();
  id.dtype = static_cast<int>(t.scalar_type());
  return id;
}

uint32_t tensor_version(const at::Tensor& t) {
  if (t.is_inference()) return 0;  // inference tensors carry no version counter
  return t.unsafeGetTensorImpl()->version_counter().current_version();
}

struct Key {
  TensorId q, s, z;
  int w_bits = 0, layout_bits = 0, order = 0;
  int64_t k = 0, c = 0, kh = 0, kw = 0;
  bool operator==(const Key& o) const {
    return q == o.q && s == o.s && z == o.z && w_bits == o.w_bits && layout_bits == o.layout_bits &&
           order == o.order && k == o.k && c == o.c && kh == o.kh && kw == o.kw;
  }
};

struct KeyHash {
  size_t operator()(const Key& key) const {
    size_t h = std::hash<const void*>()(key.q.storage);
    auto mix = [&h](size_t v) { h ^= v + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2); };
    mix(std::hash<const void*>()(key.s.storage));
    mix(std::hash<const void*>()(key.z.storage));
    mix(static_cast<size_t>(key.q.offset));
    mix(static_cast<size_t>(key.k));
    mix(static_cast<size_t>(key.w_bits * 131 + key.layout_bits * 7 + key.order));
    mix(static_cast<size_t>(key.c * 31 + key.kh * 7 + key.kw));
    return h;
  }
};

struct Entry {
  Key key;
  std::vector<WeakStorage> owners;  // keep the storage addresses reserved; expired = tensor freed
  std::vector<uint32_t> versions;
  std::shared_ptr<const PackedWeight> packed;
};

int64_t default_limit() {
  const char* env = std::getenv("QUANTKIT_REPACK_CACHE_MB");
  if (env && *env) return static_cast<int64_t>(std::atoll(env)) << 20;
  return int64_t(8192) << 20;
}

struct Cache {
  std::mutex mu;
  std::list<Entry> lru;  // front = most recently used
  std::unordered_map<Key, std::list<Entry>::iterator, KeyHash> index;
  int64_t bytes = 0, limit = default_limit(), hits = 0, misses = 0;

  void erase(std::list<Entry>::iterator it) {
    bytes -= static_cast<int64_t>(it->packed->nbytes());
    index.erase(it->key);
    lru.erase(it);
  }
  void sweep_dead() {
    for (auto it = lru.begin(); it != lru.end();) {
      bool dead = false;
      for (auto& w : it->owners) dead = dead || w.expired();
      auto next = std::next(it);
      if (dead) erase(it);
      it = next;
    }
  }
  void trim() {
    while (bytes > limit && !lru.empty()) erase(std::prev(lru.end()));
  }
};

Cache& cache() {
  static Cache* c = new Cache();  // leaked on purpose: no destruction-order issues at interpreter exit
  return *c;
}

}  // namespace

std::shared_ptr<const PackedWeight> get_packed(const at::Tensor& qdata, const at::Tensor& w_scale,
                                               const std::optional<at::Tensor>& w_zero_point, int64_t w_bits,
                                               int layout_bits, int64_t k, KOrder order, int64_t conv_c,
                                               int64_t conv_kh, int64_t conv_kw) {
  if (is_blob(qdata)) {
    auto pw = from_blob(qdata);
    TORCH_CHECK(pw->k == k && pw->w_bits == w_bits && pw->view.n == w_scale.size(0),
                "quantkit: the CPU-kernel-layout weight holds a ", pw->view.n, "x", pw->k, " ", pw->w_bits,
                "-bit weight, the call expects ", w_scale.size(0), "x", k, " ", w_bits, "-bit");
    const bool same = pw->layout_bits == layout_bits && pw->order == order &&
                      (order == KOrder::kLinear ||
                       (pw->conv_c == conv_c && pw->conv_kh == conv_kh && pw->conv_kw == conv_kw));
    if (same) return pw;
    // Packed for another layout (e.g. a W4 conv called with an out-of-range static zero point): rebuild.
    return repack(blob_to_canonical(qdata), w_scale, w_zero_point, static_cast<int>(w_bits), layout_bits, k, order,
                  conv_c, conv_kh, conv_kw);
  }
  Key key;
  key.q = tensor_id(qdata);
  key.s = tensor_id(w_scale);
  if (w_zero_point.has_value()) key.z = tensor_id(*w_zero_point);
  key.w_bits = static_cast<int>(w_bits);
  key.layout_bits = layout_bits;
  key.order = static_cast<int>(order);
  key.k = k;
  key.c = conv_c;
  key.kh = conv_kh;
  key.kw = conv_kw;
  std::vector<uint32_t> versions = {tensor_version(qdata), tensor_version(w_scale)};
  if (w_zero_point.has_value()) versions.push_back(tensor_version(*w_zero_point));

  Cache& c = cache();
  {
    std::lock_guard<std::mutex> lock(c.mu);
    auto found = c.index.find(key);
    if (found != c.index.end()) {
      auto it = found->second;
      if (it->versions == versions) {
        ++c.hits;
        c.lru.splice(c.lru.begin(), c.lru, it);
        return it->packed;
      }
      c.erase(it);  // written in place since it was packed
    }
    ++c.misses;
  }
  std::shared_ptr<const PackedWeight> packed =
      repack(qdata, w_scale, w_zero_point, static_cast<int>(w_bits), layout_bits, k, order, conv_c, conv_kh,
             conv_kw);
  Entry e;
  e.key = key;
  e.owners.push_back(qdata.storage().getWeakStorageImpl());
  e.owners.push_back(w_scale.storage().getWeakStorageImpl());
  if (w_zero_point.has_value()) e.owners.push_back(w_zero_point->storage().getWeakStorageImpl());
  e.versions = versions;
  e.packed = packed;
  {
    std::lock_guard<std::mutex> lock(c.mu);
    auto found = c.index.find(key);
    if (found != c.index.end()) c.erase(found->second);
    c.sweep_dead();
    c.lru.push_front(std::move(e));
    c.index[key] = c.lru.begin();
    c.bytes += static_cast<int64_t>(packed->nbytes());
    c.trim();
  }
  return packed;
}

CacheInfo cache_info() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  c.sweep_dead();
  CacheInfo info;
  info.entries = static_cast<int64_t>(c.lru.size());
  info.bytes = c.bytes;
  info.limit = c.limit;
  info.hits = c.hits;
  info.misses = c.misses;
  return info;
}

void cache_clear() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  c.lru.clear();
  c.index.clear();
  c.bytes = 0;
}

void cache_set_limit(int64_t bytes) {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  c.limit = bytes < 0 ? 0 : bytes;
  c.trim();
}

}  // namespace cpu
}  // namespace quantkit
