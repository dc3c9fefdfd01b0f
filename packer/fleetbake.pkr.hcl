# One fleetbake image: boot the base disk, install the executor and the pipeline, seal.

source "qemu" "fleetbake" {
  disk_image       = true
  iso_url          = var.base_image
  iso_checksum     = var.base_checksum
  output_directory = var.output_directory
  vm_name          = var.vm_name
  format           = var.format
  disk_size        = var.disk_size
  disk_interface   = "virtio"
  net_device       = "virtio-net"
  skip_compaction  = true
  accelerator      = var.accelerator
  qemu_binary      = var.qemu_binary
  machine_type     = var.machine_type
  memory           = var.memory
  cpus             = var.cpus
  headless         = true
  qemuargs         = var.qemuargs

  # The seed CD goes on virtio-scsi (drive id cdrom0; its devices are in qemuargs):
  # Debian's cloud kernel has no AHCI, so q35's default IDE CD-ROM would be invisible.
  cd_files        = var.seed_files
  cd_label        = "cidata"
  cdrom_interface = "virtio-scsi"

  communicator         = "ssh"
  ssh_username         = "root"
  ssh_private_key_file = var.ssh_private_key_file
  ssh_timeout          = var.ssh_timeout
  # sshd may answer before cloud-init has installed the build key.
  ssh_handshake_attempts = 100

  # Sealing removes the build key, so it runs last, as the shutdown command.
  shutdown_command = "sh /var/tmp/fleetbake-seal.sh"
  shutdown_timeout = "5m"
}

build {
  sources = ["source.qemu.fleetbake"]

  provisioner "shell" {
    inline = ["mkdir -p /var/tmp/fleetbake"]
  }

  provisioner "file" {
    source      = "${var.artifacts_dir}/"
    destination = "/var/tmp/fleetbake"
  }

  provisioner "file" {
    source      = "${var.scripts_dir}/seal.sh"
    destination = "/var/tmp/fleetbake-seal.sh"
  }

  provisioner "shell" {
    script           = "${var.scripts_dir}/provision.sh"
    environment_vars = var.provision_env
  }

  provisioner "file" {
    direction   = "download"
    source      = "/var/tmp/fleetbake-out/packages.tsv"
    destination = "${var.report_dir}/packages.tsv"
  }

  provisioner "file" {
    direction   = "download"
    source      = "/var/tmp/fleetbake-out/guest.env"
    destination = "${var.report_dir}/guest.env"
  }
}
