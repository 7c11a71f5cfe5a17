"""course_lib: the readable PyTorch library behind the latent-diffusion course.

Each module holds one idea of the course and links back to the lesson that teaches it.
Nothing here downloads anything, and weights are only read by explicit ``load_*`` functions.
"""

__version__ = "0.1.0"
