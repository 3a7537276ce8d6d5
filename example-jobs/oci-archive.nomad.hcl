# A batch job whose root filesystem arrives as an OCI image archive fetched by
# an artifact block: the way to deliver a real distribution's root filesystem.
#
# Do not let Nomad unpack a root filesystem tarball into the task directory
# (rootfs = "local/rootfs"): its artifact fetcher turns every symbolic link
# in the archive into an empty file (/bin/sh, /bin -> usr/bin, the dynamic
# loader), and such a task fails. An oci-archive is kept whole
# (archive = "false") and unpacked by the driver, links and all, into its
# content-addressed image cache; the manifest, config and layers are checked
# against their digests.
#
# Make the archive with any OCI tool, for example
#   skopeo copy docker://docker.io/library/debian:12 oci-archive:debian-12.tar
# and serve it where the clients can fetch it.
job "oci-archive" {
  type        = "batch"
  datacenters = ["*"]

  group "build" {
    task "build" {
      driver = "sandbox"

      artifact {
        source      = "https://artifacts.example.com/images/debian-12.tar"
        destination = "local/debian-12.tar"
        mode        = "file"

        options {
          # Keep the archive as it is; the driver unpacks it.
          archive = "false"
        }
      }

      config {
        image   = "oci-archive:local/debian-12.tar"
        command = "/bin/sh"
        args    = ["-c", "cat /etc/os-release; ls -l /bin"]
      }

      resources {
        cpu    = 200
        memory = 256
      }
    }
  }
}
