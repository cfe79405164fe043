"""Print the CMake arguments that let find_package(Torch) work with the installed torch (CPU or CUDA)."""

import glob
import os

import torch

args = [f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
if torch.version.cuda:
    from torch.utils.cpp_extension import CUDA_HOME  # honours the CUDA_HOME that scripts/_common.sh sets

    args.append(f"-DCUDA_TOOLKIT_ROOT_DIR={CUDA_HOME}")
    # pip's CUDA torch ships libnvrtc inside the nvidia-* wheels, where FindCUDA does not look.
    site = os.path.dirname(os.path.dirname(torch.__file__))
    nvrtc = sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib", "libnvrtc.so*")))
    nvrtc = [p for p in nvrtc if "builtins" not in p and ".alt." not in p]
    if nvrtc:
        args.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc[0]}")
print(" ".join(args))
