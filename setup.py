"""Only here to ship ``peft_heft-autoload.pth`` at the root of the wheel (all metadata is in pyproject.toml)."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "peft_heft-autoload.pth"


class BuildPyWithAutoload(build_py):
    def run(self):
        super().run()
        self.copy_file(PTH, os.path.join(self.build_lib, PTH), preserve_mode=False)

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH)]


setup(cmdclass={"build_py": BuildPyWithAutoload})
