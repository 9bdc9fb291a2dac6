#pragma once
// Code instantiated in the per-capability CPU kernel files must not share symbol names
// across capabilities: the linker would keep one copy (maybe the AVX512 one) for all.
// Headers shared with those files put their templates in this inline namespace, as
// ATen does for at::vec.
#if defined(CPU_CAPABILITY)
#define PYOPS_ISA_NAMESPACE CPU_CAPABILITY
#else
#define PYOPS_ISA_NAMESPACE generic
#endif
