// The smallest Python extension module: the build-lock tests compile it in about a second
// (the real kernels take a minute each), so they can build, wait and recover for real.
#include <Python.h>

#define LIVELM_CONCAT_(a, b) a##b
#define LIVELM_CONCAT(a, b) LIVELM_CONCAT_(a, b)
#define LIVELM_STR_(a) #a
#define LIVELM_STR(a) LIVELM_STR_(a)

static struct PyModuleDef tiny_module = {PyModuleDef_HEAD_INIT, LIVELM_STR(TORCH_EXTENSION_NAME),
                                         nullptr, -1, nullptr};

PyMODINIT_FUNC LIVELM_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&tiny_module); }
