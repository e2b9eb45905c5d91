"""`python -m platform.status JOB_ID`: status of a job started with `submit --detach`."""

from platform.jobs import entry

if __name__ == "__main__":
    entry("status")
