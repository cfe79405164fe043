"""Print the CMake arguments that let find_package(Torch) work with the installed torch (CPU or CUDA)."""

import glob
import os
import shutil

import torch

args = [f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
if torch.version.cuda:
    nvcc = shutil.which("nvcc")
    cuda_home = os.environ.get("CUDA_HOME") or (os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else "")
    if os.path.isdir("/usr/local/cuda") and not os.path.isdir(os.path.join(cuda_home, "include")):
        cuda_home = "/usr/local/cuda"
    args.append(f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_home}")
    # pip's CUDA torch ships libnvrtc inside the nvidia-* wheels, where FindCUDA does not look.
    site = os.path.dirname(os.path.dirname(torch.__file__))
    nvrtc = sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib", "libnvrtc.so*")))
    nvrtc = [p for p in nvrtc if "builtins" not in p and ".alt." not in p]
    if nvrtc:
        args.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc[0]}")
print(" ".join(args))
