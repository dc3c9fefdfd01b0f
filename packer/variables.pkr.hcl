# Inputs of the fleetbake image build. `imagefactory render` writes their values for
# one target into fleetbake.auto.pkrvars.hcl next to these files.

variable "base_image" {
  type        = string
  description = "The base qcow2 (a self-booting Debian disk) the build starts from."
}

variable "base_checksum" {
  type        = string
  description = "Checksum of base_image, as Packer spells it: \"sha256:HEX\", or \"none\"."
}

variable "output_directory" {
  type        = string
  description = "Where Packer writes the image; per target, so parallel builds never collide."
}

variable "vm_name" {
  type        = string
  description = "File name of the image inside output_directory."
}

variable "format" {
  type        = string
  default     = "qcow2"
  description = "Disk format Packer writes (qcow2 or raw)."
}

variable "disk_size" {
  type        = string
  default     = "4G"
  description = "Virtual disk size; the root filesystem grows to it at first boot."
}

variable "memory" {
  type        = number
  default     = 1024
  description = "Guest memory in MiB."
}

variable "cpus" {
  type        = number
  default     = 2
  description = "Guest vCPUs."
}

variable "accelerator" {
  type        = string
  default     = "tcg"
  description = "kvm when it really works on this host, else tcg."
}

variable "qemu_binary" {
  type        = string
  description = "qemu-system-* for the target architecture."
}

variable "machine_type" {
  type        = string
  description = "QEMU machine type."
}

variable "qemuargs" {
  type        = list(list(string))
  description = "Extra QEMU arguments: CPU model, firmware, serial log, restricted user network. Never -drive."
}

variable "seed_files" {
  type        = list(string)
  description = "meta-data and user-data of the build's NoCloud seed (per-build SSH key)."
}

variable "ssh_private_key_file" {
  type        = string
  description = "Private half of the per-build SSH key."
}

variable "ssh_timeout" {
  type        = string
  default     = "20m"
  description = "How long to wait for the guest's SSH server (TCG boots are slow)."
}

variable "artifacts_dir" {
  type        = string
  description = "Host directory with the executor bundle, pipeline archive and executor.service."
}

variable "scripts_dir" {
  type        = string
  description = "Host directory with provision.sh and seal.sh."
}

variable "report_dir" {
  type        = string
  description = "Host directory that receives the guest's package list and versions."
}

variable "provision_env" {
  type        = list(string)
  description = "KEY=value environment of provision.sh: the guest paths it installs to (imagefactory/bake/artifacts.py)."
}
