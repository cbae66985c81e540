// The CPU kernels XLA lacks, as XLA FFI handlers (float32, NHWC):
// - oneDNN's convolutions: forward (optionally with its bias), input
//   gradient and kernel gradient of a 2-D convolution with an HWIO kernel,
//   grouped or not, any strides and non-negative padding;
// - a max-pool and its gradient, routed like XLA's select_and_scatter.
//
// Built on first use by resnet_jax/cpu/native.py (g++, oneDNN's wheel, the FFI
// headers that ship with jaxlib) and registered as custom-call targets.
//
// Layouts: activations stay NHWC in XLA's buffers and oneDNN reads and writes
// them in place (format nhwc). Kernels are HWIO in XLA; oneDNN's fastest
// kernels want a blocked weight layout, so the kernel is reordered into the
// layout the primitive chose (a copy of the small tensor, never of the
// activations) and the kernel gradient is reordered back.
//
// Concurrency: XLA may run independent custom calls at the same time (the
// two gradient convolutions of one layer, or the devices of a multi-device
// CPU client). Primitives are shared through a cache, so each call brings
// its own scratchpad (oneDNN's user scratchpad mode) and reorder buffer from
// thread-local storage.

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;

namespace {

using BiasBuffer = ffi::Buffer<ffi::F32, 1>;

// The binding of the handlers that take two float32 buffers and return one,
// with the int64 "params" attribute that describes the op.
auto TwoToOneBinding() {
  return ffi::Ffi::Bind()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<ffi::Span<const int64_t>>("params");
}

enum Pass : int64_t { kForward = 0, kInputGrad = 1, kKernelGrad = 2 };

// How the kernel gradient is computed (oneDNN's default choice is not the
// fastest everywhere; conv.auto_plan picks one per layer shape):
// kNhwc: on the NHWC activations in place; kBlocked: on copies of x and dy
// in the layout the primitive prefers (on large maps its blocked kernels
// more than repay the copies); kGemm: oneDNN's im2col + GEMM implementation
// (small maps with many channels).
enum Variant : int64_t { kNhwc = 0, kBlocked = 1, kGemm = 2 };

// One convolution problem: everything a primitive depends on.
struct Problem {
  int64_t pass, n, h, w, c, kh, kw, o, groups, ho, wo, sh, sw, pt, pb, pl, pr;
  int64_t bias;  // the forward adds a bias (fused into the convolution)
  int64_t variant;  // kernel gradient: a Variant

  std::string Key() const {
    std::string key(sizeof(Problem), '\0');
    std::memcpy(key.data(), this, sizeof(Problem));
    return key;
  }
};

// A primitive plus what executing it needs: the layout it wants the kernel
// (or its gradient) in, and the reorder between that and HWIO when the two
// differ.
struct Prepared {
  dnnl::primitive primitive;
  memory::desc hwio;        // XLA's kernel layout
  memory::desc blocked;     // the primitive's kernel layout
  bool reorder = false;
  dnnl::reorder kernel_reorder;  // hwio -> blocked, or blocked -> hwio
  size_t scratch_bytes = 0;
  // kBlocked: the activations' layouts and the copies into them.
  memory::desc src_blocked, dst_blocked;
  dnnl::reorder src_reorder, dst_reorder;
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

std::atomic<int> g_threads{0};  // 0: OpenMP's default

// The OpenMP team size of the calling thread's parallel regions.
void SetThreads() {
  if (int threads = g_threads.load(std::memory_order_relaxed); threads > 0) {
    omp_set_num_threads(threads);
  }
}

// Kernel dims (and XLA's HWIO strides) in oneDNN's order: (O, I, KH, KW),
// or (G, O/G, I/G, KH, KW) for grouped convolutions.
memory::desc HwioDesc(const Problem& p) {
  const int64_t ig = p.c / p.groups, og = p.o / p.groups;
  if (p.groups == 1) {
    return memory::desc({p.o, p.c, p.kh, p.kw}, memory::data_type::f32,
                        memory::dims{1, p.o, p.kw * p.c * p.o, p.c * p.o});
  }
  return memory::desc({p.groups, og, ig, p.kh, p.kw}, memory::data_type::f32,
                      memory::dims{og, 1, p.o, p.kw * ig * p.o, ig * p.o});
}

memory::desc AnyKernelDesc(const Problem& p) {
  const int64_t ig = p.c / p.groups, og = p.o / p.groups;
  memory::dims dims = p.groups == 1
                          ? memory::dims{p.o, p.c, p.kh, p.kw}
                          : memory::dims{p.groups, og, ig, p.kh, p.kw};
  return memory::desc(dims, memory::data_type::f32, tag::any);
}

std::unique_ptr<Prepared> Prepare(const Problem& p) {
  auto& engine = Engine();
  const auto f32 = memory::data_type::f32;
  memory::desc src({p.n, p.c, p.h, p.w}, f32, tag::nhwc);
  memory::desc dst({p.n, p.o, p.ho, p.wo}, f32, tag::nhwc);
  memory::dims strides{p.sh, p.sw}, pad_l{p.pt, p.pl}, pad_r{p.pb, p.pr};
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);

  auto prepared = std::make_unique<Prepared>();
  prepared->hwio = HwioDesc(p);
  const memory::desc src_nhwc = src, dst_nhwc = dst;
  if (p.pass == kKernelGrad && p.variant == kBlocked) {
    src = memory::desc({p.n, p.c, p.h, p.w}, f32, tag::any);
    dst = memory::desc({p.n, p.o, p.ho, p.wo}, f32, tag::any);
  }
  // The backward primitives are created with the forward one as their hint.
  dnnl::convolution_forward::primitive_desc fwd =
      p.bias ? dnnl::convolution_forward::primitive_desc(
                   engine, dnnl::prop_kind::forward_training,
                   dnnl::algorithm::convolution_direct, src, AnyKernelDesc(p),
                   memory::desc({p.o}, f32, tag::x), dst, strides, pad_l,
                   pad_r, attr)
             : dnnl::convolution_forward::primitive_desc(
                   engine, dnnl::prop_kind::forward_training,
                   dnnl::algorithm::convolution_direct, src, AnyKernelDesc(p),
                   dst, strides, pad_l, pad_r, attr);
  dnnl::primitive_desc_base pd = fwd;
  if (p.pass == kForward) {
    prepared->primitive = dnnl::convolution_forward(fwd);
    prepared->blocked = fwd.weights_desc();
  } else if (p.pass == kInputGrad) {
    dnnl::convolution_backward_data::primitive_desc bwd(
        engine, dnnl::algorithm::convolution_direct, src, AnyKernelDesc(p), dst,
        strides, pad_l, pad_r, fwd, attr);
    prepared->primitive = dnnl::convolution_backward_data(bwd);
    prepared->blocked = bwd.weights_desc();
    pd = bwd;
  } else {
    auto make = [&] {
      return dnnl::convolution_backward_weights::primitive_desc(
          engine, dnnl::algorithm::convolution_direct, src, AnyKernelDesc(p),
          dst, strides, pad_l, pad_r, fwd, attr);
    };
    auto bwd = make();
    if (p.variant == kGemm) {
      bool found = false;
      do {
        found = std::string(bwd.impl_info_str()).find("gemm") != std::string::npos;
      } while (!found && bwd.next_impl());
      if (!found) bwd = make();  // none here: oneDNN's first choice
    }
    prepared->primitive = dnnl::convolution_backward_weights(bwd);
    prepared->blocked = bwd.diff_weights_desc();
    if (bwd.src_desc() != src_nhwc) {
      prepared->src_blocked = bwd.src_desc();
      prepared->src_reorder = dnnl::reorder(dnnl::reorder::primitive_desc(
          engine, src_nhwc, engine, prepared->src_blocked));
    }
    if (bwd.diff_dst_desc() != dst_nhwc) {
      prepared->dst_blocked = bwd.diff_dst_desc();
      prepared->dst_reorder = dnnl::reorder(dnnl::reorder::primitive_desc(
          engine, dst_nhwc, engine, prepared->dst_blocked));
    }
    pd = bwd;
  }
  prepared->scratch_bytes = pd.scratchpad_desc().get_size();
  prepared->reorder = prepared->blocked != prepared->hwio;
  if (prepared->reorder) {
    const bool to_hwio = p.pass == kKernelGrad;
    const auto& from = to_hwio ? prepared->blocked : prepared->hwio;
    const auto& to = to_hwio ? prepared->hwio : prepared->blocked;
    prepared->kernel_reorder =
        dnnl::reorder(dnnl::reorder::primitive_desc(engine, from, engine, to));
  }
  return prepared;
}

const Prepared& Lookup(const Problem& p) {
  static std::mutex mu;
  static std::unordered_map<std::string, std::unique_ptr<Prepared>> cache;
  const std::string key = p.Key();
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(key);
    if (it != cache.end()) return *it->second;
  }
  auto prepared = Prepare(p);  // outside the lock: creation takes a while
  std::lock_guard<std::mutex> lock(mu);
  auto [it, inserted] = cache.emplace(key, std::move(prepared));
  return *it->second;
}

// A growing, 64-byte aligned, per-thread buffer.
struct Buffer {
  void* data = nullptr;
  size_t size = 0;
  void* Get(size_t bytes) {
    if (bytes > size) {
      std::free(data);
      size = (bytes + 4095) / 4096 * 4096;
      data = std::aligned_alloc(64, size);
      if (data == nullptr) size = 0;
    }
    return data;
  }
  ~Buffer() { std::free(data); }
};

ffi::Error Run(const Problem& p, void* src, void* kernel, void* dst,
               void* bias = nullptr) {
  try {
    SetThreads();
    const Prepared& prep = Lookup(p);
    thread_local Buffer scratch_buffer, kernel_buffer, src_buffer, dst_buffer;
    thread_local dnnl::stream stream(Engine());
    void* scratch = scratch_buffer.Get(prep.scratch_bytes);
    void* blocked = prep.reorder
                        ? kernel_buffer.Get(prep.blocked.get_size())
                        : kernel;
    const bool src_copy = prep.src_blocked.get_ndims() > 0;
    const bool dst_copy = prep.dst_blocked.get_ndims() > 0;
    void* src_blocked = src_copy ? src_buffer.Get(prep.src_blocked.get_size()) : src;
    void* dst_blocked = dst_copy ? dst_buffer.Get(prep.dst_blocked.get_size()) : dst;
    if ((prep.scratch_bytes && !scratch) || !blocked || !src_blocked ||
        !dst_blocked) {
      return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                        "oneDNN convolution: out of memory for its buffers");
    }
    auto& engine = Engine();
    const auto f32 = memory::data_type::f32;
    memory src_mem({{p.n, p.c, p.h, p.w}, f32, tag::nhwc}, engine, src);
    memory dst_mem({{p.n, p.o, p.ho, p.wo}, f32, tag::nhwc}, engine, dst);
    memory hwio_mem(prep.hwio, engine, kernel);
    memory blocked_mem(prep.blocked, engine, blocked);
    std::unordered_map<int, memory> args;
    if (prep.scratch_bytes) {
      args.emplace(DNNL_ARG_SCRATCHPAD,
                   memory({{static_cast<int64_t>(prep.scratch_bytes)},
                           memory::data_type::u8, tag::x},
                          engine, scratch));
    }
    if (p.pass == kForward) {
      args.insert({{DNNL_ARG_SRC, src_mem}, {DNNL_ARG_WEIGHTS, blocked_mem},
                   {DNNL_ARG_DST, dst_mem}});
      if (p.bias) {
        args.emplace(DNNL_ARG_BIAS, memory({{p.o}, f32, tag::x}, engine, bias));
      }
    } else if (p.pass == kInputGrad) {
      args.insert({{DNNL_ARG_DIFF_DST, dst_mem}, {DNNL_ARG_WEIGHTS, blocked_mem},
                   {DNNL_ARG_DIFF_SRC, src_mem}});
    } else {
      memory x_mem = src_mem, dy_mem = dst_mem;
      if (src_copy) {
        x_mem = memory(prep.src_blocked, engine, src_blocked);
        prep.src_reorder.execute(stream, src_mem, x_mem);
      }
      if (dst_copy) {
        dy_mem = memory(prep.dst_blocked, engine, dst_blocked);
        prep.dst_reorder.execute(stream, dst_mem, dy_mem);
      }
      args.insert({{DNNL_ARG_SRC, x_mem}, {DNNL_ARG_DIFF_DST, dy_mem},
                   {DNNL_ARG_DIFF_WEIGHTS, blocked_mem}});
    }
    if (p.pass != kKernelGrad && prep.reorder) {
      prep.kernel_reorder.execute(stream, hwio_mem, blocked_mem);
    }
    prep.primitive.execute(stream, args);
    if (p.pass == kKernelGrad && prep.reorder) {
      prep.kernel_reorder.execute(stream, blocked_mem, hwio_mem);
    }
    stream.wait();
    return ffi::Error::Success();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("oneDNN convolution: ") + e.what());
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("oneDNN convolution: ") + e.what());
  }
}

// params: strides (2), pads (top, bottom, left, right), groups, and for
// the kernel gradient a Variant.
ffi::Error MakeProblem(Pass pass, ffi::Span<const int64_t> params,
                       ffi::AnyBuffer::Dimensions x, ffi::AnyBuffer::Dimensions k,
                       ffi::AnyBuffer::Dimensions y, Problem* p) {
  if (params.size() < 7 || params.size() > 8 || x.size() != 4 || k.size() != 4 ||
      y.size() != 4) {
    return ffi::Error::InvalidArgument(
        "oneDNN convolution: expects NHWC x and y, an HWIO kernel and 7-8 params");
  }
  *p = Problem{pass, x[0], x[1], x[2], x[3], k[0], k[1], k[3], params[6],
               y[1], y[2], params[0], params[1], params[2], params[3],
               params[4], params[5], 0, params.size() > 7 ? params[7] : kNhwc};
  if (p->groups < 1 || p->c != k[2] * p->groups || p->o % p->groups ||
      y[0] != x[0] || y[3] != p->o || p->variant < kNhwc || p->variant > kGemm) {
    return ffi::Error::InvalidArgument(
        "oneDNN convolution: inconsistent shapes, groups or variant");
  }
  if (pass != kKernelGrad) p->variant = kNhwc;
  return ffi::Error::Success();
}

// The forward convolution, plus `bias` (added as oneDNN writes y) if given.
ffi::Error RunForward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                      const BiasBuffer* bias, ffi::ResultBuffer<ffi::F32> y,
                      ffi::Span<const int64_t> params) {
  Problem p;
  if (auto e = MakeProblem(kForward, params, x.dimensions(), kernel.dimensions(),
                           y->dimensions(), &p);
      e.failure()) {
    return e;
  }
  if (bias == nullptr) {
    return Run(p, x.untyped_data(), kernel.untyped_data(), y->untyped_data());
  }
  if (bias->dimensions()[0] != p.o) {
    return ffi::Error::InvalidArgument("oneDNN convolution: bias size != O");
  }
  p.bias = 1;
  return Run(p, x.untyped_data(), kernel.untyped_data(), y->untyped_data(),
             bias->untyped_data());
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                   ffi::ResultBuffer<ffi::F32> y,
                   ffi::Span<const int64_t> params) {
  return RunForward(x, kernel, nullptr, y, params);
}

ffi::Error ForwardBias(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                       BiasBuffer bias, ffi::ResultBuffer<ffi::F32> y,
                       ffi::Span<const int64_t> params) {
  return RunForward(x, kernel, &bias, y, params);
}

ffi::Error InputGrad(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> kernel,
                     ffi::ResultBuffer<ffi::F32> dx,
                     ffi::Span<const int64_t> params) {
  Problem p;
  if (auto e = MakeProblem(kInputGrad, params, dx->dimensions(),
                           kernel.dimensions(), dy.dimensions(), &p);
      e.failure()) {
    return e;
  }
  return Run(p, dx->untyped_data(), kernel.untyped_data(), dy.untyped_data());
}

ffi::Error KernelGrad(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                      ffi::ResultBuffer<ffi::F32> dkernel,
                      ffi::Span<const int64_t> params) {
  Problem p;
  if (auto e = MakeProblem(kKernelGrad, params, x.dimensions(),
                           dkernel->dimensions(), dy.dimensions(), &p);
      e.failure()) {
    return e;
  }
  return Run(p, x.untyped_data(), dkernel->untyped_data(), dy.untyped_data());
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnetOnednnConvForward, Forward,
                              TwoToOneBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnetOnednnConvForwardBias, ForwardBias,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<BiasBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<ffi::Span<const int64_t>>("params"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnetOnednnConvInputGrad, InputGrad,
                              TwoToOneBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnetOnednnConvKernelGrad, KernelGrad,
                              TwoToOneBinding());

// ---------------------------------------------------------------- max-pool
//
// XLA's CPU backend turns the max-pool gradient into select_and_scatter, a
// scalar loop; written out as strided views in JAX it still costs several
// passes over the stem's activation (the largest of the network), whose
// producer XLA fuses into each view. Here: one pass for the forward, one for
// the gradient, which recomputes each window's first maximum from x.

namespace {
struct PoolShape { int64_t n, h, w, c, ho, wo, kh, kw, sh, sw, pt, pl; };

ffi::Error PoolShapeOf(ffi::AnyBuffer::Dimensions x, ffi::AnyBuffer::Dimensions y,
                       ffi::Span<const int64_t> params, PoolShape* s) {
  if (x.size() != 4 || y.size() != 4 || params.size() != 6 || x[0] != y[0] ||
      x[3] != y[3]) {
    return ffi::Error::InvalidArgument("max pool: expects NHWC x, y and 6 params");
  }
  *s = PoolShape{x[0], x[1], x[2], x[3], y[1], y[2], params[0], params[1],
                 params[2], params[3], params[4], params[5]};
  return ffi::Error::Success();
}

ffi::Error MaxPoolForward(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y,
                          ffi::Span<const int64_t> params) {
  PoolShape s;
  if (auto e = PoolShapeOf(x.dimensions(), y->dimensions(), params, &s); e.failure()) return e;
  SetThreads();
  const float* in = x.typed_data();
  float* out = y->typed_data();
  const int64_t c = s.c;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t n = 0; n < s.n; ++n) {
    for (int64_t oh = 0; oh < s.ho; ++oh) {
      for (int64_t ow = 0; ow < s.wo; ++ow) {
        float* o = out + ((n * s.ho + oh) * s.wo + ow) * c;
        for (int64_t k = 0; k < c; ++k) o[k] = -std::numeric_limits<float>::infinity();
        for (int64_t i = 0; i < s.kh; ++i) {
          const int64_t ih = oh * s.sh + i - s.pt;
          if (ih < 0 || ih >= s.h) continue;
          for (int64_t j = 0; j < s.kw; ++j) {
            const int64_t iw = ow * s.sw + j - s.pl;
            if (iw < 0 || iw >= s.w) continue;
            const float* v = in + ((n * s.h + ih) * s.w + iw) * c;
            for (int64_t k = 0; k < c; ++k) o[k] = v[k] > o[k] ? v[k] : o[k];
          }
        }
      }
    }
  }
  return ffi::Error::Success();
}

// dx: dy routed to the first maximum of each window in window order (as
// XLA's select_and_scatter routes it), summed where windows overlap.
ffi::Error MaxPoolInputGrad(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                            ffi::ResultBuffer<ffi::F32> dx,
                            ffi::Span<const int64_t> params) {
  PoolShape s;
  if (auto e = PoolShapeOf(x.dimensions(), dy.dimensions(), params, &s); e.failure()) return e;
  SetThreads();
  const float* in = x.typed_data();
  const float* g = dy.typed_data();
  float* out = dx->typed_data();
  const int64_t c = s.c;
#pragma omp parallel
  {
    std::vector<float> best(c);
    std::vector<int32_t> where(c);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < s.n; ++n) {  // examples are independent: no races
      float* dxn = out + n * s.h * s.w * c;
      std::fill(dxn, dxn + s.h * s.w * c, 0.0f);
      for (int64_t oh = 0; oh < s.ho; ++oh) {
        for (int64_t ow = 0; ow < s.wo; ++ow) {
          std::fill(best.begin(), best.end(), -std::numeric_limits<float>::infinity());
          std::fill(where.begin(), where.end(), -1);
          for (int64_t i = 0; i < s.kh; ++i) {
            const int64_t ih = oh * s.sh + i - s.pt;
            if (ih < 0 || ih >= s.h) continue;
            for (int64_t j = 0; j < s.kw; ++j) {
              const int64_t iw = ow * s.sw + j - s.pl;
              if (iw < 0 || iw >= s.w) continue;
              const float* v = in + ((n * s.h + ih) * s.w + iw) * c;
              const int32_t pos = static_cast<int32_t>(ih * s.w + iw);
              for (int64_t k = 0; k < c; ++k) {
                const bool more = v[k] > best[k] || where[k] < 0;
                best[k] = more ? v[k] : best[k];
                where[k] = more ? pos : where[k];
              }
            }
          }
          const float* gy = g + ((n * s.ho + oh) * s.wo + ow) * c;
          for (int64_t k = 0; k < c; ++k) {
            if (where[k] >= 0) dxn[where[k] * c + k] += gy[k];
          }
        }
      }
    }
  }
  return ffi::Error::Success();
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnetMaxPoolForward, MaxPoolForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<ffi::Span<const int64_t>>("params"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnetMaxPoolInputGrad, MaxPoolInputGrad,
                              TwoToOneBinding());

// Threads of each call (0: OpenMP's default, the usable cores).
extern "C" void ResnetCpuKernelsSetThreads(int threads) { g_threads.store(threads); }

extern "C" int ResnetOnednnVersion() {
  const dnnl_version_t* v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}
