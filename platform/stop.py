"""`python -m platform.stop JOB_ID`: stop of a job started with `submit --detach`."""

from platform.jobs import entry

if __name__ == "__main__":
    entry("stop")
