// Load-time repacking of canonical packed weights into the CPU panel layouts, and the cache that holds them.
//
// The canonical format (src/quantkit/formats/spec.py) is the only thing ever stored. Kernels need the codes
// transposed into panels of kNR output columns (and, for convolutions, K reordered tap-major), so every op
// call looks its weight up here first. The cache:
//   * keys on the identity of the qdata / w_scale / w_zero_point storages (StorageImpl pointers, offsets,
//     shapes) plus the layout; it holds weak references to those storages, so an address cannot be reused by
//     another tensor while its entry exists, and entries of freed tensors are swept on the next insertion;
//   * validates the tensors' version counters on every hit: an in-place write (copy_, load_state_dict) makes
//     the next call repack. Writes that bypass the version counter (through `.data`, numpy views, or on
//     inference tensors, which have no version counter) are not seen: call quantkit.ops.native.clear_cache();
//   * is bounded: least recently used entries are evicted beyond QUANTKIT_REPACK_CACHE_MB (default 8192 MiB).
//     The repacked weight is the same size as the canonical one (plus per-group int32 sums), so the default
//     holds a full SDXL UNet.
#include <ATen/Parallel.h>
#include <c10/core/StorageImpl.h>
#include <c10/util/intrusive_ptr.h>

#include <cstdlib>
#include <list>
#include <mutex>
#include <tuple>
#include <unordered_map>

#include "internal.h"
#include "quantkit/format.h"

namespace quantkit {
namespace cpu {

size_t PackedWeight::nbytes() const {
  return b.nbytes() + wzp.nbytes() + swc.nbytes() + scale.nbytes() + kmap.size() * sizeof(int32_t) +
         seg_off.size() * sizeof(int64_t);
}

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
void build_kmap(PackedWeight& pw) {
  const int align = pw.layout_bits == 4 ? 8 : 4;
  const int64_t taps = pw.order == KOrder::kConv ? pw.conv_kh * pw.conv_kw : 1;
  const bool tap_major = taps > 1 && pw.group_len % taps == 0;
  pw.seg_off.assign(pw.groups + 1, 0);
  pw.kmap.clear();
  for (int64_t g = 0; g < pw.groups; ++g) {
    pw.seg_off[g] = static_cast<int64_t>(pw.kmap.size());
    const int64_t base = g * pw.group_len;
    if (tap_major) {
      const int64_t cg = pw.group_len / taps;
      for (int64_t t = 0; t < taps; ++t)
        for (int64_t cc = 0; cc < cg; ++cc) pw.kmap.push_back(static_cast<int32_t>(base + cc * taps + t));
    } else {
      for (int64_t j = 0; j < pw.group_len; ++j) pw.kmap.push_back(static_cast<int32_t>(base + j));
    }
    while (pw.kmap.size() % align) pw.kmap.push_back(-1);
  }
  pw.seg_off[pw.groups] = static_cast<int64_t>(pw.kmap.size());
}

std::shared_ptr<PackedWeight> repack(const at::Tensor& qdata, const at::Tensor& w_scale,
                                     const std::optional<at::Tensor>& w_zero_point, int w_bits, int layout_bits,
                                     int64_t k, KOrder order, int64_t conv_c, int64_t conv_kh, int64_t conv_kw) {
  const int64_t n = qdata.size(0);
  auto pw = std::make_shared<PackedWeight>();
  pw->w_bits = w_bits;
  pw->layout_bits = layout_bits;
  pw->k = k;
  pw->groups = w_scale.size(1);
  TORCH_CHECK(pw->groups >= 1 && k % pw->groups == 0, "quantkit: ", pw->groups,
              " weight groups do not divide in_features ", k);
  pw->group_len = k / pw->groups;
  pw->order = order;
  pw->conv_c = conv_c;
  pw->conv_kh = conv_kh;
  pw->conv_kw = conv_kw;
  build_kmap(*pw);

  const at::Tensor q = qdata.contiguous();
  const at::Tensor sc = scale_f32(w_scale, n);
  const at::Tensor zp = zero_point_i32(w_zero_point, sc, w_bits);
  const int64_t words = q.size(1);
  const int64_t npanels = (n + kNR - 1) / kNR;
  const int64_t kp = static_cast<int64_t>(pw->kmap.size());
  const int64_t nseg = pw->groups;
  const int64_t panel_bytes = layout_bits == 4 ? kp / 2 * kNR : kp * kNR;

  auto opts = at::TensorOptions().device(at::kCPU);
  pw->b = at::zeros({npanels * panel_bytes}, opts.dtype(at::kByte));
  pw->wzp = at::zeros({npanels, nseg, kNR}, opts.dtype(at::kInt));
  pw->swc = at::zeros({npanels, nseg, kNR}, opts.dtype(at::kInt));
  pw->scale = at::zeros({npanels, nseg, kNR}, opts.dtype(at::kFloat));

  const int32_t* qp = q.data_ptr<int32_t>();
  const float* scp = sc.data_ptr<float>();
  const int32_t* zpp = zp.data_ptr<int32_t>();
  uint8_t* bp = pw->b.data_ptr<uint8_t>();
  int32_t* wzpp = pw->wzp.data_ptr<int32_t>();
  int32_t* swcp = pw->swc.data_ptr<int32_t>();
  float* spp = pw->scale.data_ptr<float>();
  const int32_t* kmap = pw->kmap.data();
  const int64_t* seg_off = pw->seg_off.data();
  std::vector<int64_t> max_abs(static_cast<size_t>(npanels), 0);
  // Position i of a nibble block is stored in nibble kSlot[i] (inverse of nib_pos).
  static const int kSlot[8] = {0, 2, 4, 6, 1, 3, 5, 7};

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
          wzpp[pi] = z;
          spp[pi] = scp[row * nseg + g];
          int64_t sum = 0;
          for (int64_t p = seg_off[g]; p < seg_off[g + 1]; ++p) {
            const int32_t src = kmap[p];
            if (src < 0) continue;  // padding: code 0, excluded from the sums
            const int c = codes[src];
            sum += c - z;
            const int64_t d = c - z < 0 ? z - c : c - z;
            mx = d > mx ? d : mx;
            if (layout_bits == 8) {
              pb[(p >> 1) * 2 * kNR + nn * 2 + (p & 1)] = static_cast<uint8_t>(c);
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
  for (int64_t v : max_abs) pw->max_abs_wc = v > pw->max_abs_wc ? v : pw->max_abs_wc;

  PanelWeight& v = pw->view;
  v.w_bits = layout_bits;
  v.n = n;
  v.npanels = npanels;
  v.nseg = static_cast<int>(nseg);
  v.kp = kp;
  v.seg_off = pw->seg_off.data();
  v.b = bp;
  v.panel_bytes = panel_bytes;
  v.wzp = wzpp;
  v.swc = swcp;
  v.scale = spp;
  return pw;
}

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
